"""gpu_check.py --quick: the GPU check's steps at tiny shapes on the CPU, so that the script a GPU machine
runs once, offline, does not rot between the times it gets one. Its torchrun launches are left out: the
suite launches the same runs under torchrun in test_ddp.py and test_fsdp.py."""
import conftest


def test_gpu_check_runs_every_step_at_tiny_shapes(tmp_path):
    p = conftest.run("gpu_check.py", "--quick", cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = [line for line in p.stdout.splitlines() if line.startswith("| ")][1:]
    results = dict(line.strip("| ").split(" | ", 1) for line in table)
    assert len(results) == 11 and not any(r.startswith("FAILED") for r in results.values()), results
    assert results["graph breaks (compiled training forward)"] == "0"
    assert "tok/s" in results["bench, fp16 with a gradient scaler"] and "tokens/s" in results["sampling"]
    assert not list(tmp_path.iterdir())  # it writes into a folder of its own
