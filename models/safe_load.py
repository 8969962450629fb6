"""The one reader of weight files that users name: no code from a file ever runs.

Every load path (the CLIP, GLIP and student teachers, training's
``init_from`` and backbone weights, the driver's preflight) reads user files
through :func:`read_tensors`:

* ``.safetensors`` and ``.npz`` (``allow_pickle=False``) hold only tensors;
* TorchScript archives (OpenAI's CLIP release files are these) are read by a
  restricted unpickler: their ``data.pkl`` may name only TorchScript module
  classes (stand-ins that hold attributes and run nothing), tensor rebuilds,
  storages and ``OrderedDict``; the ``code/`` folder is read as text only, for
  each class's declared ``__parameters__``/``__buffers__``, so the result is
  the same state dict ``torch.jit.load(...).state_dict()`` would give, without
  compiling or running the archive's methods (its ``__setstate__`` included);
* anything else goes through ``torch.load(weights_only=True)``.

A file that needs more than that to load is refused with one line naming
``labelmill convert-weights SRC DST --trust-source``, which a user runs once,
on a machine they trust, to turn it into a plain tensor file. That command is
the only place where ``torch.jit.load`` or unrestricted unpickling is called.
Non-finite weights are refused with the tensor's name (:func:`check_finite`).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Mapping

import torch

from labelmill.models.common import WeightsError


class UnsafeWeightsError(WeightsError):
    """The file would run code (or unpickle arbitrary objects) to load."""


def convert_hint(path: str | os.PathLike) -> str:
    return (f"on a machine you trust, run `labelmill convert-weights {os.fspath(path)} OUT.safetensors "
            "--trust-source` once and point the config at OUT")


# ------------------------------------------------------------------- reading
def read_tensors(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read without running any code from it.

    ``{"model": sd}`` and ``{"state_dict": sd}`` wrappers are unwrapped;
    entries that are not tensors are dropped. Raises :class:`WeightsError`
    (one line) for a missing or unreadable file and :class:`UnsafeWeightsError`
    for a file that would need code to load.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".npz", ".npy")):
        return _read_numpy(path)
    if is_torchscript(path):
        return read_torchscript(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{path} is refused: loading it would unpickle more than tensors ({_why(exc)}); labelmill never "
            f"runs code from a weights file; {convert_hint(path)}"
        ) from None
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable weights file: {type(exc).__name__}: {_first_line(exc)}") from None
    return _unwrap(obj, path)


def peek_keys(path: str | os.PathLike) -> list[str] | None:
    """The keys of a weights file without reading its tensors where the format allows; None if unreadable."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                return list(fh.keys())
        return list(read_tensors(path, mmap=True))
    except Exception:
        return None


def check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse NaN or infinite weights, naming the first tensor that has them.

    Attention-mask buffers (``*mask*``) may hold infinities by design (a
    causal mask is -inf above the diagonal); NaN is refused everywhere.
    """
    def wrong(key: str, value: torch.Tensor) -> bool:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()):
            return False
        return bool(torch.isnan(value).any()) if "mask" in key.rsplit(".", 1)[-1] else not bool(torch.isfinite(value).all())

    bad = [k for k, v in state.items() if wrong(k, v)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightsError(f"{os.fspath(source)}: tensor {bad[0]!r}{more} holds NaN or infinite values; "
                           "the file is corrupted or from a diverged run")


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(path, device="cpu"))
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from None


def _read_numpy(path: str) -> dict[str, torch.Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise WeightsError(f"{path} holds one array, not a state dict (a .npz of named arrays is needed)")
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise UnsafeWeightsError(
                f"{path} holds object arrays (pickled Python objects), which labelmill never unpickles; "
                "a .npz must hold plain numeric arrays, one per state-dict key") from None
        raise WeightsError(f"{path} is not a readable .npz state dict: {_first_line(exc)}") from None


def _unwrap(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _why(exc: BaseException) -> str:
    """The part of torch's weights_only refusal that says what the file asked for."""
    text = str(exc)
    found = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand \d+|Unsupported class [^\s]+)", text)
    return found.group(1) if found else _first_line(exc)


# ---------------------------------------------------------------- TorchScript
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
#: class declarations in an archive's code/ files (read as text, never compiled)
_CLASS_RE = re.compile(
    r"^class (\w+)\(Module\):\n  __parameters__ = \[([^\]]*)\]\n  __buffers__ = \[([^\]]*)\]", re.M)


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive: a zip with ``constants.pkl`` (what ``torch.load`` itself tests)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _ScriptObject:
    """Stands in for a TorchScript class: keeps the pickled state, runs nothing."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


class _LazyTensor:
    """What a tensor rebuild yields when only the pickle is checked (preflight)."""


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, *metadata):
    if isinstance(storage, _LazyTensor):
        return storage
    if backward_hooks:
        raise UnsafeWeightsError("a tensor in the archive carries backward hooks")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(offset))
    except RuntimeError as exc:
        raise WeightsError(f"a tensor's size {tuple(size)} does not fit its storage: {_first_line(exc)}") from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    if backward_hooks:
        raise UnsafeWeightsError("a parameter in the archive carries backward hooks")
    return data


def _identity_list(items, *rest):
    return list(items)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, *rest: value,
}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, fh, zf: zipfile.ZipFile, prefix: str, path: str, lazy: bool):
        super().__init__(fh)
        self.zf, self.prefix, self.path, self.lazy = zf, prefix, path, lazy
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafeWeightsError(
            f"{self.path} is refused: its TorchScript pickle names {module}.{name}, which labelmill does not "
            f"load (it never runs code from a weights file); {convert_hint(self.path)}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeWeightsError(f"{self.path}: unexpected storage reference {str(pid)[:80]}; {convert_hint(self.path)}")
        _, kind, key, _location, numel = pid
        if self.lazy:
            return _LazyTensor()
        if key not in self.storages:
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            try:
                raw = self.zf.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise WeightsError(f"{self.path}: storage {key} is missing from the archive") from None
            if len(raw) < numel * itemsize:
                raise WeightsError(f"{self.path}: storage {key} is truncated")
            buf = bytearray(raw)
            del raw
            flat = (torch.frombuffer(buf, dtype=torch.uint8)[: numel * itemsize] if numel
                    else torch.empty(0, dtype=torch.uint8))
            self.storages[key] = flat.view(kind.dtype)
        return self.storages[key]


def _declared_tensors(zf: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """{class qualname: parameter and buffer names} from the archive's code/ files (text only)."""
    declared: dict[str, set[str]] = {}
    root = f"{prefix}code/"
    for name in zf.namelist():
        if not (name.startswith(root) and name.endswith(".py")):
            continue
        module = name[len(root):-3].replace("/", ".")
        text = zf.read(name).decode("utf-8", "replace")
        for cls, params, buffers in _CLASS_RE.findall(text):
            names = re.findall(r'"([^"]+)"', params + buffers)
            declared[f"{module}.{cls}"] = set(names)
    return declared


def _archive_root(zf: zipfile.ZipFile, path: str) -> str:
    pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise WeightsError(f"{path} is not a TorchScript archive with one data.pkl")
    prefix = pkls[0][: -len("data.pkl")]
    order = f"{prefix}byteorder"
    if order in zf.namelist() and zf.read(order).strip() != b"little":
        raise WeightsError(f"{path} was written on a big-endian machine; {convert_hint(path)}")
    return prefix


def read_torchscript(path: str | os.PathLike, *, lazy: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript module archive, or (``lazy``) only a check that it can be read safely."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{path} is not a readable archive: {_first_line(exc)}") from None
    with zf:
        prefix = _archive_root(zf, path)
        unpickler = _ArchiveUnpickler(io.BytesIO(zf.read(f"{prefix}data.pkl")), zf, prefix, path, lazy)
        try:
            root = unpickler.load()
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"{path}: its TorchScript pickle cannot be read safely: {_first_line(exc)}; "
                               f"{convert_hint(path)}") from None
        if not isinstance(root, _ScriptObject):
            raise WeightsError(f"{path} is a TorchScript archive of a {type(root).__name__}, not of a module")
        if lazy:
            return {}
        declared = _declared_tensors(zf, prefix)
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", declared, state, set())
    return state


def _collect(obj: _ScriptObject, prefix: str, declared: dict[str, set[str]], out: dict, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    attrs = obj.__dict__.get("state")
    if not isinstance(attrs, dict):
        return  # a custom __getstate__: its state has no names (and is never handed to its __setstate__)
    names = declared.get(obj.qualname)
    for key, value in attrs.items():
        if isinstance(value, torch.Tensor) and (names is None or key in names):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{key}.", declared, out, seen)


# ------------------------------------------------------------------ preflight
def check_readable(path: str | os.PathLike) -> None:
    """Cheap driver-side check that :func:`read_tensors` will accept the file; runs nothing from it.

    TorchScript archives: only the pickle is read (tensors stay on disk).
    Zip-format torch files are memory-mapped.
    """
    path = os.fspath(path)
    if is_torchscript(path):
        read_torchscript(path, lazy=True)
    elif path.endswith(".safetensors"):
        if peek_keys(path) is None:
            raise WeightsError(f"{path} is not a readable safetensors file")
    else:
        read_tensors(path, mmap=True)


# ----------------------------------------------------------------- conversion
def convert_weights(src: str, dst: str, *, trust_source: bool = False) -> dict[str, Any]:
    """Turn any supported checkpoint into a plain tensor file every load path reads safely.

    Files that the safe reader accepts are converted without ``trust_source``.
    Others (pickles of arbitrary objects, TorchScript archives whose pickle
    names other classes) are loaded with ``torch.jit.load`` or
    ``torch.load(weights_only=False)``, which run code from the file, only
    when ``trust_source`` is given. ``dst`` ending in ``.safetensors`` is
    written as safetensors, anything else with ``torch.save`` of a flat dict of
    tensors (read back with ``weights_only=True``).
    """
    if os.path.abspath(src) == os.path.abspath(dst):
        raise WeightsError("convert-weights writes a new file: SRC and DST are the same path")
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} exists; remove it or choose another DST")
    trusted = False
    try:
        state = read_tensors(src)
    except UnsafeWeightsError as exc:
        if not trust_source:
            raise UnsafeWeightsError(
                f"{src} needs code to load ({_first_line(exc).split('refused: ')[-1].split(';')[0]}); converting "
                "it runs that code: pass --trust-source only if you trust where the file came from") from None
        state, trusted = _read_trusted(src), True
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if not state:
        raise WeightsError(f"{src} holds no tensors")
    check_finite(state, src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.partial"
    if dst.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, dst)
    if dst.endswith(".safetensors"):
        back = _read_safetensors(dst)
    else:
        back = _unwrap(torch.load(dst, map_location="cpu", weights_only=True), dst)
    if set(back) != set(state):
        raise WeightsError(f"{dst} did not read back with the same keys")
    return {"source": os.path.abspath(src), "dest": os.path.abspath(dst), "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values())), "ran_code_from_source": trusted}


def _read_trusted(src: str) -> dict[str, torch.Tensor]:
    """Load a trusted file the unsafe way (the one place labelmill does)."""
    try:
        if is_torchscript(src):
            obj: Any = torch.jit.load(src, map_location="cpu")
        else:
            obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(f"{src} cannot be loaded even as a trusted file: {_first_line(exc)}") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj:
            inner = obj[key]
            obj = inner.state_dict() if isinstance(inner, torch.nn.Module) else inner
    return _unwrap(obj, src)
