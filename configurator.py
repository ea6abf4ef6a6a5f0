"""
Command-line configuration shared by every script.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=True

Arguments are applied left to right: a config file is Python whose top-level
assignments override the script's defaults; --key=value overrides one key, the
value parsed with ast.literal_eval (a bare word is taken as a string), and a bare
--key sets a boolean key to True. A value
must have the type of the default it replaces (an int may stand for a float).

Every mistake ends the program with one line that says what to do instead, and exit status 2: fail()
where a script checks its input itself, or an InputError raised anywhere below it (a checkpoint, a
tokenizer file, a dataset the user named), which report() turns into that line. Any other exception is a
bug, and keeps its traceback.
"""
import ast
import atexit
import contextlib
import difflib
import os
import sys


class InputError(ValueError):
    """Input the user can fix: the message says what is wrong and what to do."""


def fail(message):
    """Stop with one line on stderr and exit status 2: the house style for bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def report(error_type, error, traceback):
    """sys.excepthook of every script: an InputError that nothing caught ends the program as fail() does."""
    if not issubclass(error_type, InputError):
        return sys.__excepthook__(error_type, error, traceback)
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    atexit._run_exitfuncs()  # as the interpreter would on its way out; it would exit 1, and bad input is 2
    os._exit(2)


sys.excepthook = report


def _unknown_key(key, defaults):
    close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(sorted(defaults))}"
    return f"unknown config key {key!r}; {hint}"


def _coerce(key, value, default):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        raise ValueError(f"{key} must be {type(default).__name__} (like its default {default!r}), "
                         f"got {type(value).__name__} {value!r}")
    return value


def _parse_value(raw, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as --device=cuda
    if isinstance(default, str) and not isinstance(value, str):
        value = raw  # --out_dir=123 means the string "123"
    return value


def configure(defaults, argv):
    """Return a copy of `defaults` with the config files and --key=value of argv applied."""
    return {**defaults, **overrides(defaults, argv)}


def overrides(defaults, argv):
    """Only the keys that argv's config files and --key=value set, checked against `defaults`."""
    config = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not eq and isinstance(defaults.get(key), bool):
                eq, raw = "=", "True"  # a bare --flag switches a boolean on
            if not eq or not key:
                fail(f"malformed argument {arg!r}; write --key=value")
            if key not in defaults:
                fail(_unknown_key(key, defaults))
            try:
                config[key] = _coerce(key, _parse_value(raw, defaults[key]), defaults[key])
            except ValueError as e:
                fail(str(e))
        else:
            if not os.path.isfile(arg):
                fail(f"config file {arg!r} not found (arguments are config files or --key=value)")
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            except Exception as e:
                fail(f"config file {arg} raised {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or type(value).__name__ in ("module", "function", "type"):
                    continue
                if key not in defaults:
                    fail(f"in {arg}: " + _unknown_key(key, defaults))
                try:
                    config[key] = _coerce(key, value, defaults[key])
                except ValueError as e:
                    fail(f"in {arg}: {e}")
    return config


def defaults_from(namespace):
    """The config values among a script's module globals: lower-case public ints, floats, bools and strs."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))}


def resolve_device(device):
    """'auto' picks CUDA when present; a device this machine lacks is an error, not a crash later. A GPU
    named by number becomes the current one, so that synchronising, memory figures and the CUDA random
    state are that GPU's, not GPU 0's."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available here; use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        fail(f"device {device!r} requested but MPS is not available here; use --device=cpu")
    if device_type not in ("cpu", "cuda", "mps"):
        fail(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and ":" in device and int(device.split(":")[1] or 0) >= torch.cuda.device_count():
        fail(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    if device_type == "cuda" and ":" in device:
        torch.cuda.set_device(device)
    return device


def cpu_has_fast_bf16():
    """bf16 matmuls beat fp32 only on CPUs with AMX or AVX512-BF16; elsewhere they are several times
    slower (RESULTS.md)."""
    import torch
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_dtype(dtype, device):
    """'auto' is bf16 wherever the hardware runs it fast, else fp16 on older GPUs, else fp32."""
    import torch
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):  # emulated bf16 (a T4, a V100) is slower than fp16 with a scaler
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "bfloat16" if device == "cpu" and cpu_has_fast_bf16() else "float32"


def resolve_sampling_dtype(dtype, device):
    """The dtype generation stores the weights in: as resolve_dtype, but 'auto' is fp32 on any CPU. Each token reads
    every weight once, and a CPU streams fp32 weights on every core through model.Linear's blocked product, which
    bf16's product does not (RESULTS.md)."""
    return "float32" if dtype == "auto" and device == "cpu" else resolve_dtype(dtype, device)


def allow_tf32():
    """Let CUDA run fp32 matmuls and convolutions on TensorFloat-32 cores: through fp32_precision where
    torch has it, as torch 2.9 and later warn about allow_tf32, and mixing the two broke inductor in 2.10."""
    import torch
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def script_defaults(path):
    """The config defaults a script declares: its top-level literal assignments before it calls configure.
    Lets bench.py accept the same config files and keys as train.py without a second copy of them."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", "") == "configure":
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # computed values are not config
    return defaults_from(defaults)


def autocast(device, dtype):
    """The mixed-precision context for a resolved device and dtype: nothing for float32."""
    import torch
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
