"""`sdterm doctor`: each finding OK or a problem with its fix."""

from __future__ import annotations

import hashlib
import json
import shutil

from sdterm import paths


def test_doctor_reports_models_hashes_tokenizer_and_cache(demo_model, run_cli):
    models = paths.data_dir() / "models"
    models.mkdir(parents=True)
    shutil.copytree(demo_model, models / "demo")
    code, out, err = run_cli("doctor", "--json")
    assert code == 0, err
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    for name in ("python", "torch", "cuda", "settings", "model", "tokenizer", "cache", "terminal"):
        assert name in checks, name
    digest = hashlib.sha256((models / "demo" / "model.safetensors").read_bytes()).hexdigest()
    assert checks["model"]["status"] == "ok" and digest[:10] in checks["model"]["detail"]
    assert checks["tokenizer"]["status"] == "warn" and "sdterm download" in checks["tokenizer"]["fix"]
    assert all(c["status"] in ("ok", "warn", "fail") for c in checks.values())


def test_doctor_fails_on_a_broken_model_and_says_what_to_do(run_cli):
    models = paths.data_dir() / "models"
    models.mkdir(parents=True)
    (models / "broken.safetensors").write_bytes(b"\x00" * 100)
    code, out, err = run_cli("doctor")
    assert code == 1
    assert "[FAIL] model" in out and "broken.safetensors" in out and "fix:" in out
    assert "Traceback" not in out + err
