"""scripts/bench_tta.py: the quick mode runs every contender on one model and writes the ratios to TPT; the
acceptance checks read the right rows; --append keeps another model's run."""
import json
import sys
from pathlib import Path

from tests.test_scripts import SCRIPTS, _script


def _bench():
    sys.path.insert(0, str(SCRIPTS))  # (the test process, not a script: scripts/ is not on its path)
    try:
        import bench_tta
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_tta


def test_quick_mode_times_every_contender_against_tpt(tmp_path):
    out = tmp_path / "tta.json"
    _script("bench_tta.py", "--quick", "--threads", "1", "--out", str(out), cwd=tmp_path)
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["provenance"]["torch_threads"] == 1
    (model,) = doc["models"]
    rows = {r["method"]: r for r in model["rows"]}
    assert set(rows) == {*_bench().METHODS, "tpt_reference"} and model["classes"] == 100
    assert rows["tpt"]["ratio_to_tpt"] == 1.0 and rows["tpt"]["episodic"] and rows["zero"]["episodic"]
    assert not rows["tda_64"]["episodic"]
    assert [rows[m]["views"] for m in ("zeroshot", "tda_1view", "tda_64", "dmn", "zero")] == [1, 1, 64, 32, 64]
    for r in rows.values():
        assert r["cpu_s"] > 0 and abs(r["ratio_to_tpt"] * r["speedup_vs_tpt"] - 1) < 1e-9
        assert abs(r["ratio_to_tpt_reference"] * r["speedup_vs_tpt_reference"] - 1) < 1e-9
    assert rows["tpt_reference"]["ratio_to_tpt_reference"] == 1.0
    assert set(model["acceptance"]) == {"tda_1view speedup_vs_tpt >= 20.0", "tda_64 ratio_to_tpt <= 0.6",
                                        "tda_1view speedup_vs_tpt_reference >= 20.0",
                                        "tda_64 ratio_to_tpt_reference <= 0.6"}
    # --append: another model's entry stays, this model's is replaced
    doc["models"].append({**model, "model_key": "vitb16"})
    out.write_text(json.dumps(doc))
    _script("bench_tta.py", "--quick", "--threads", "1", "--out", str(out), "--append", "--methods", "tpt",
            "zeroshot", cwd=tmp_path)
    models = json.loads(out.read_text())["models"]
    assert [m["model_key"] for m in models] == ["vitb16", "micro"] and len(models[1]["rows"]) == 2
    assert all(v is None for v in models[1]["acceptance"].values())  # TDA was not run: nothing to claim


def test_acceptance_reads_the_two_claims():
    acceptance = _bench().acceptance
    rows = [{"method": "tda_1view", "speedup_vs_tpt": 25.0, "ratio_to_tpt": 0.04},
            {"method": "tda_64", "speedup_vs_tpt": 1.5, "ratio_to_tpt": 0.66}]
    got = acceptance(rows)  # no reference contender in these rows: its two checks are None (not run)
    assert got == {"tda_1view speedup_vs_tpt >= 20.0": True, "tda_64 ratio_to_tpt <= 0.6": False,
                   "tda_1view speedup_vs_tpt_reference >= 20.0": None, "tda_64 ratio_to_tpt_reference <= 0.6": None}
    rows[0]["speedup_vs_tpt"], rows[1]["ratio_to_tpt"] = 19.9, 0.6
    rows[1]["ratio_to_tpt_reference"] = 0.41
    got = acceptance(rows)
    assert got["tda_1view speedup_vs_tpt >= 20.0"] is False and got["tda_64 ratio_to_tpt <= 0.6"] is True
    assert got["tda_64 ratio_to_tpt_reference <= 0.6"] is True
