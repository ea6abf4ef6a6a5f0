"""configurator.configure: what it accepts and how it refuses."""

import os
import subprocess
import sys

import pytest
import torch

import configurator
from configurator import configure, cpu_has_fast_bf16, resolve_device, resolve_dtype

DEFAULTS = {
    "batch_size": 12,
    "block_size": 256,
    "learning_rate": 6e-4,
    "device": "auto",
    "out_dir": "checkpoint/run",
    "compile": False,
    "dropout": 0.0,
}


def bad(argv, capsys, defaults=DEFAULTS):
    """Run configure on argv expecting fail(): exit status 2 and one 'error: ...' line on stderr."""
    with pytest.raises(SystemExit) as exc:
        configure(defaults, argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err
    return lines[0]


# --------------------------------------------------------------------------- good input

def test_no_arguments_returns_a_copy_of_the_defaults():
    config = configure(DEFAULTS, [])
    assert config == DEFAULTS
    config["batch_size"] = 99
    assert DEFAULTS["batch_size"] == 12


def test_config_file_then_overrides_left_to_right(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import math\n"
        "_helper = 7\n"
        "def twice(x):\n    return 2 * x\n"
        "batch_size = twice(16)\n"
        "learning_rate = 1e-3\n"
        "device = 'cpu'\n"
    )
    config = configure(DEFAULTS, [str(cfg)])
    assert config["batch_size"] == 32
    assert config["learning_rate"] == 1e-3
    assert config["device"] == "cpu"
    assert "math" not in config and "twice" not in config and "_helper" not in config

    # an override after the file wins; a later override wins over an earlier one
    config = configure(DEFAULTS, [str(cfg), "--batch_size=8", "--batch_size=4"])
    assert config["batch_size"] == 4
    # a file after an override wins over it
    config = configure(DEFAULTS, ["--batch_size=8", str(cfg)])
    assert config["batch_size"] == 32
    assert set(config) == set(DEFAULTS)


def test_int_is_accepted_for_a_float_default():
    config = configure(DEFAULTS, ["--learning_rate=1", "--dropout=0"])
    assert config["learning_rate"] == 1.0 and type(config["learning_rate"]) is float
    assert config["dropout"] == 0.0 and type(config["dropout"]) is float


def test_int_in_config_file_becomes_float(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("learning_rate = 2\n")
    config = configure(DEFAULTS, [str(cfg)])
    assert config["learning_rate"] == 2.0 and type(config["learning_rate"]) is float


def test_float_value():
    assert configure(DEFAULTS, ["--learning_rate=3e-4"])["learning_rate"] == 3e-4


def test_bare_word_is_a_string():
    assert configure(DEFAULTS, ["--device=cpu"])["device"] == "cpu"
    assert configure(DEFAULTS, ["--device='cuda:0'"])["device"] == "cuda:0"
    assert configure(DEFAULTS, ["--out_dir=checkpoint/x y"])["out_dir"] == "checkpoint/x y"


def test_number_for_a_string_key_stays_the_string():
    config = configure(DEFAULTS, ["--out_dir=123"])
    assert config["out_dir"] == "123" and type(config["out_dir"]) is str
    assert configure(DEFAULTS, ["--out_dir=1.5"])["out_dir"] == "1.5"
    assert configure(DEFAULTS, ["--out_dir=True"])["out_dir"] == "True"


def test_bools():
    assert configure(DEFAULTS, ["--compile=True"])["compile"] is True
    assert configure({**DEFAULTS, "compile": True}, ["--compile=False"])["compile"] is False


def test_value_may_contain_equals_sign():
    assert configure(DEFAULTS, ["--out_dir=a=b"])["out_dir"] == "a=b"


# --------------------------------------------------------------------------- bad input

def test_unknown_key_suggests_the_closest(capsys):
    line = bad(["--batch_sise=3"], capsys)
    assert "batch_sise" in line
    assert "did you mean" in line and "batch_size" in line


def test_unknown_key_far_from_everything_lists_valid_keys(capsys):
    line = bad(["--zzzzzzzz=3"], capsys)
    assert "zzzzzzzz" in line
    for key in DEFAULTS:
        assert key in line


def test_float_for_int_key_fails(capsys):
    line = bad(["--batch_size=3.5"], capsys)
    assert "batch_size" in line and "int" in line and "3.5" in line


def test_int_for_bool_key_fails(capsys):
    line = bad(["--compile=1"], capsys)
    assert "compile" in line and "bool" in line


def test_bool_for_int_key_fails(capsys):
    line = bad(["--batch_size=True"], capsys)
    assert "batch_size" in line


def test_bare_word_for_number_fails(capsys):
    line = bad(["--learning_rate=fast"], capsys)
    assert "learning_rate" in line and "float" in line and "fast" in line


def test_malformed_argument_without_equals(capsys):
    line = bad(["--batch_size"], capsys)
    assert "--batch_size" in line and "--key=value" in line


def test_malformed_argument_without_key(capsys):
    line = bad(["--=3"], capsys)
    assert "malformed" in line


def test_missing_config_file(tmp_path, capsys):
    missing = str(tmp_path / "nope.py")
    line = bad([missing], capsys)
    assert missing in line and "not found" in line


def test_config_file_that_raises(tmp_path, capsys):
    cfg = tmp_path / "boom.py"
    cfg.write_text("batch_size = 4\nx = 1 / 0\n")
    line = bad([str(cfg)], capsys)
    assert str(cfg) in line and "ZeroDivisionError" in line


def test_config_file_with_syntax_error(tmp_path, capsys):
    cfg = tmp_path / "broken.py"
    cfg.write_text("batch_size = = 4\n")
    line = bad([str(cfg)], capsys)
    assert "SyntaxError" in line


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 4\nbatch_sise = 3\n")
    line = bad([str(cfg)], capsys)
    assert str(cfg) in line and "batch_sise" in line and "batch_size" in line


def test_wrong_type_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("compile = 'yes'\n")
    line = bad([str(cfg)], capsys)
    assert str(cfg) in line and "compile" in line and "bool" in line


# --------------------------------------------------------------------------- devices and dtypes

# The hardware's answers are forced both ways (monkeypatch); the choice made from them is the code under test.

@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_dtype_on_the_cpu_is_bf16_only_where_it_is_fast(monkeypatch, fast_bf16):
    monkeypatch.setattr(configurator, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if fast_bf16 else "float32")
    assert resolve_dtype("auto", "mps") == "float32"
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize("native,emulated", [(True, True), (False, True), (False, False)])
def test_auto_dtype_on_a_gpu_is_native_bf16_else_fp16(monkeypatch, native, emulated):
    """A GPU without bf16 units (a T4, a V100) can still emulate it, and torch counts that by default:
    auto asks for the native units alone, and takes fp16 with a scaler without them."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (including_emulation and emulated))
    monkeypatch.setattr(configurator, "cpu_has_fast_bf16", lambda: not native)  # the GPU's answer decides
    for device in ("cuda", "cuda:1"):
        assert resolve_dtype("auto", device) == ("bfloat16" if native else "float16")
    assert resolve_dtype("float32", "cuda") == "float32"


def test_a_gpu_named_by_number_becomes_the_current_device(monkeypatch):
    """Synchronising, memory figures and the CUDA random state follow the current device: --device=cuda:1
    in one process must make GPU 1 current, or they would all be GPU 0's."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == "cuda:1" and current == ["cuda:1"]
    assert resolve_device("cuda") == "cuda" and current == ["cuda:1"]  # plain cuda is the current one already


class Precision:
    """Stands in for torch.backends.cuda.matmul or cudnn.conv, as torch has them with or without the
    fp32_precision setting (2.9 and later)."""

    def __init__(self, current):
        if current:
            self.fp32_precision = "ieee"


@pytest.mark.parametrize("current", [True, False])
def test_tf32_is_allowed_through_the_api_torch_has(monkeypatch, current):
    monkeypatch.setattr(torch.backends.cuda, "matmul", Precision(current))
    monkeypatch.setattr(torch.backends.cudnn, "conv", Precision(current), raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False, raising=False)
    configurator.allow_tf32()
    if current:  # the old switches left alone: mixing both broke inductor in torch 2.10
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert not hasattr(torch.backends.cuda.matmul, "allow_tf32") and torch.backends.cudnn.allow_tf32 is False
    else:
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


def test_fast_bf16_cpu_is_one_with_amx_or_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    assert cpu_has_fast_bf16() == ("amx_tile" in flags or "avx512_bf16" in flags)


def test_resolve_dtype_bogus_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        resolve_dtype("bogus", "cpu")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bogus" in err and len(err.strip().splitlines()) == 1


def test_resolve_device_cpu_and_unknown(capsys):
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(SystemExit) as exc:
        resolve_device("tpu")
    assert exc.value.code == 2
    assert "tpu" in capsys.readouterr().err


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_is_cuda_where_present(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_device("auto") == ("cuda" if cuda else "cpu")


def test_resolve_device_cuda_without_cuda_fails(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        resolve_device("cuda")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "CUDA is not available" in err and "--device=cpu" in err

# The scripts' own command lines are covered case by case in test_bad_input.py.


@pytest.mark.parametrize("raised,status", [("InputError('dataset x not found; make it with prepare.py')", 2),
                                           ("KeyError('a bug')", 1)])
def test_an_input_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, raised, status):
    """configurator.report as the sys.excepthook of a real interpreter: an InputError raised anywhere ends the
    program in one line with exit status 2, after the exit handlers (wandb finishes there); any other
    exception is a bug, reported with its traceback and exit status 1, as Python does."""
    script = tmp_path / "script.py"
    script.write_text("import atexit\nfrom configurator import InputError\n"
                      f"atexit.register(print, 'exit handlers ran')\nraise {raised}\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == status and p.stdout == "exit handlers ran\n", (p.returncode, p.stdout, p.stderr)
    if status == 2:
        assert p.stderr == "error: dataset x not found; make it with prepare.py\n"
    else:
        assert "Traceback" in p.stderr and "KeyError: 'a bug'" in p.stderr


def test_bool_for_float_key_fails(capsys):
    # True is an int to Python, but never a learning rate
    line = bad(["--learning_rate=True"], capsys)
    assert "learning_rate" in line and "float" in line and "True" in line
