"""Reusable adapters injected into or wrapped around CLIP (prompt context, LoRA)."""
