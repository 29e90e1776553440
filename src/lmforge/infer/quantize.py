"""Weight-only quantization of every Linear layer: int8 per output channel, int4 group-wise.

int8 is symmetric, one scale per output row: q = round(W / scale) in [-127, 127]. int4 is
asymmetric, a scale and a minimum per group of `group_size` inputs, round to nearest, two values
per byte (input column 2j in the low nibble): W ~ q * scale_g + min_g with q in [0, 15].
`QuantLinear.reference_forward` unpacks the weight to the activation dtype and runs ordinary
matmuls (one path for CPU and GPU): exact for the stored weights, it saves memory and disk, not
time. A fused low-precision kernel (`lmforge.infer.qlinear`, chosen per layer shape by timing)
can replace it through `set_kernel`. Embeddings, norms and a tied head stay unquantized. The
formulas and the run-directory format: docs/quantization.md.

Letters: O out_features, I in_features, G groups per row (I / group_size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.io import atomic_dir, atomic_write_json
from lmforge.model import ModelConfig, load_pretrained
from lmforge.model.pretrained import model_from_state_dict

QUANT_CONFIG_NAME = "quantization.json"
GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------------------------
# int8, per output channel


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (O, I) float -> (q (O, I) int8, scale (O,) float32).
    [[1., -0.5], [0.2, 0.1]] -> q [[127, -64], [127, 64]], scale [1/127, 0.2/127]"""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (O,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]  # (O, I)


# ---------------------------------------------------------------------------------------------
# int4, group-wise, two per byte


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(O, I) values in [0, 15] -> (O, I/2) uint8, even columns in the low nibble.
    [[1, 2, 15, 0]] -> [[0x21, 0x0f]]"""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(O, I/2) uint8 -> (O, I) uint8 in [0, 15]; the inverse of pack_int4."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8, device=packed.device)  # (O, I)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


CLIP_RATIOS = [1.0 - 0.04 * i for i in range(1, 11)]  # 0.96 .. 0.60 of a group's range, for the search
SEARCH_CHUNK = 1 << 18  # weights searched at once: small enough for the cache (4x faster than whole 16M-weight layers)


def _int4_round(g: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)


def _int4_rtn(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups (R, G, n) -> (q, scale, minimum): round to nearest over each group's [min, max]."""
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (R, G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    return _int4_round(g, lo, scale), scale, lo


def _int4_search(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups (R, G, n) -> (q, scale, minimum) minimising each group's squared error.

    Round-to-nearest over the full [min, max] spends levels on outliers. Candidates: that range,
    the range shrunk around its centre or from either end (CLIP_RATIOS), and a least-squares
    refit of (scale, minimum) to the chosen levels (twice); each group keeps its best. Data-free,
    as llama.cpp's k-quants and AWQ's clip search do it; measured in docs/quantization.md."""
    q, s, m = _int4_rtn(g)
    best = torch.full(s.shape, float("inf"))

    def keep(q2, s2, m2):
        nonlocal q, s, m, best
        err = ((q2 * s2[..., None] + m2[..., None] - g) ** 2).sum(-1)
        better = err < best
        q = torch.where(better[..., None], q2, q)
        s, m, best = torch.where(better, s2, s), torch.where(better, m2, m), torch.minimum(err, best)

    keep(q, s, m)
    lo, span = m, s * 15.0
    for r in CLIP_RATIOS:
        s2 = (span * r / 15.0).clamp(min=1e-12)
        for l in (lo + span * (1 - r) / 2, lo, lo + span * (1 - r)):  # shrunk around the centre, from the top, from the bottom
            keep(_int4_round(g, l, s2), s2, l)
    n = g.shape[-1]
    for _ in range(2):  # least squares: scale, minimum = argmin ||q * scale + minimum - w||^2 for these q
        sq, sw, sqq, sqw = q.sum(-1), g.sum(-1), (q * q).sum(-1), (q * g).sum(-1)
        det = n * sqq - sq * sq
        s2 = torch.where(det > 0, (n * sqw - sq * sw) / det.clamp(min=1e-12), s).clamp(min=1e-12)
        m2 = (sw - s2 * sq) / n
        keep(_int4_round(g, m2, s2), s2, m2)
    return q, s, m


def quantize_int4(w: torch.Tensor, group_size: int, search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (O, I) -> (packed (O, I/2) uint8, scale (O, G) float32, minimum (O, G) float32).

    search: pick each group's range by the least squared error (`_int4_search`); False: plain
    round-to-nearest over [min, max]."""
    O, I = w.shape
    if I % group_size or I % 2:
        raise ValueError(f"in_features={I} is not a multiple of group_size={group_size}")
    g = w.float().reshape(O, I // group_size, group_size)  # (O, G, group)
    if not search:
        q, scale, lo = _int4_rtn(g)
    else:
        rows = max(1, SEARCH_CHUNK // I)
        parts = [_int4_search(g[i:i + rows]) for i in range(0, O, rows)]
        q, scale, lo = (torch.cat(t) for t in zip(*parts))
    return pack_int4(q.reshape(O, I)), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    O, G = scale.shape
    q = unpack_int4(packed).to(dtype).reshape(O, G, -1)  # (O, G, group)
    return (q * scale.to(dtype)[..., None] + minimum.to(dtype)[..., None]).reshape(O, -1)  # (O, I)


# ---------------------------------------------------------------------------------------------
# the module


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as int8 or packed int4: unpacked for each matmul (the
    reference), or multiplied by a fused kernel installed with `set_kernel`."""

    kernel = None  # a callable x -> y from lmforge.infer.qlinear; None: the reference path

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 64, bias: bool = False, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: expected 8 or 4")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, device=device))
            self.minimum = None
        else:
            if in_features % group_size:
                raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
            G = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, G, device=device))
            self.register_buffer("minimum", torch.zeros(out_features, G, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._register_state_dict_hook(_qweight_from_kernel)

    def set_kernel(self, kernel) -> None:
        """Multiply through `kernel` (None: the reference). A kernel that holds the only copy of
        the weight (`replaces_qweight`, a prepacked int8 matrix) frees the `qweight` buffer, so
        memory stays at the quantized size; `state_dict()` and `int_weight()` unpack it again."""
        if self._buffers.get("qweight") is None and self.kernel is not None:
            self._buffers["qweight"] = self.kernel.qweight()
        self.kernel = kernel
        if kernel is not None and getattr(kernel, "replaces_qweight", False):
            self._buffers["qweight"] = None

    def int_weight(self) -> torch.Tensor:
        """The stored integer weight: int8 (O, I) or packed int4 (O, I/2) uint8."""
        q = self._buffers.get("qweight")
        return q if q is not None else self.kernel.qweight()

    def weight_nbytes(self) -> int:
        """Bytes of the stored weight, scales and minima (what the model keeps in memory)."""
        q = self.bits // 8 if self.bits == 8 else 0.5
        n = int(self.in_features * self.out_features * q)
        return n + sum(t.numel() * t.element_size() for t in (self.scale, self.minimum) if t is not None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64, search: bool = True) -> "QuantLinear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None, device=w.device)
        if bits == 8:
            q.qweight, q.scale = quantize_int8(w)
        else:
            q.qweight, q.scale, q.minimum = quantize_int4(w, group_size, search)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.float())
        return q

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(self.int_weight(), self.scale, dtype)
        return dequantize_int4(self.int_weight(), self.scale, self.minimum, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unpacking path: what every fused kernel is checked against."""
        if self._buffers.get("qweight") is None:
            raise RuntimeError("the reference path needs the unpacked weight: call set_kernel(None) first")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.bits == 8:  # x @ (q * s)^T = (x @ q^T) * s: scale the (.., O) output, not the (O, I) weight
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
            return y if bias is None else y + bias
        # int4: the low nibbles hold the even input columns, the high ones the odd columns, so
        # x @ W^T = x[even] @ W_low^T + x[odd] @ W_high^T, without interleaving the nibbles back
        O, G = self.scale.shape
        s, m = self.scale.to(x.dtype)[..., None], self.minimum.to(x.dtype)[..., None]  # (O, G, 1)
        w_even = ((self.qweight & 0x0F).to(x.dtype).view(O, G, -1) * s + m).view(O, -1)  # (O, I/2)
        w_odd = ((self.qweight >> 4).to(x.dtype).view(O, G, -1) * s + m).view(O, -1)  # (O, I/2)
        return F.linear(x[..., 0::2], w_even, bias) + F.linear(x[..., 1::2], w_odd)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def _qweight_from_kernel(module: "QuantLinear", state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: a layer whose kernel holds the only copy of its weight still saves `qweight`."""
    if module._buffers.get("qweight") is None and module.kernel is not None:
        state_dict[prefix + "qweight"] = module.kernel.qweight()


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers to quantize: all of them except a head tied to the embedding."""
    tied = getattr(model.config, "tie_embeddings", False)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not (tied and name == "lm_head")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, search: bool = True,
                   head_bits: int | None = None) -> nn.Module:
    """Replace every quantizable Linear by a QuantLinear, in place; returns the model.
    search (int4): each group's range by least squared error (`quantize_int4`); False: round to nearest.
    head_bits: the bits of an untied output head. None (the default): 8 in an int4 model, since the
    head is the one layer whose error reaches every logit directly (llama.cpp's 4-bit types keep it
    at 6 bits); `bits` otherwise. The record's "module_bits" lists the modules with their own width."""
    head_bits = (8 if bits == 4 else bits) if head_bits is None else head_bits
    for flag, b in (("--bits", bits), ("--head-bits", head_bits)):
        if b not in (4, 8):
            raise ValueError(f"{flag} {b}: expected 8 or 4")
    if 4 in (bits, head_bits) and group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: expected one of {GROUP_SIZES}")
    module_bits = {}
    for name in quantizable_linears(model):
        b = head_bits if name == "lm_head" else bits
        if b != bits:
            module_bits[name] = b
        _set_module(model, name, QuantLinear.from_linear(model.get_submodule(name), b, group_size, search))
    scheme = ("int8 symmetric per output channel" if bits == 8 else
              "int4 asymmetric group-wise, two per byte" + (", range by least squared error" if search else ", round to nearest"))
    if module_bits:
        scheme += "; " + ", ".join(f"{name} int{b}" for name, b in module_bits.items())
    model.quantization = {"bits": bits, "group_size": group_size if 4 in (bits, head_bits) else None, "scheme": scheme,
                          "modules": quantizable_linears_of(model), **({"module_bits": module_bits} if module_bits else {})}
    return model


def quantizable_linears_of(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the Linear weights take now, bytes they would take in fp32)."""
    now = fp32 = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            now += m.weight_nbytes()
            fp32 += 4 * m.in_features * m.out_features
        elif isinstance(m, nn.Linear) and not (getattr(model.config, "tie_embeddings", False) and name == "lm_head"):
            now += m.weight.numel() * m.weight.element_size()
            fp32 += 4 * m.weight.numel()
    return now, fp32


# ---------------------------------------------------------------------------------------------
# run directories


def read_quant_record(run_dir: Path) -> dict:
    """quantization.json of a quantized run directory, its fields checked."""
    path = run_dir / QUANT_CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["bits"], record["modules"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid quantization record ({e})") from None
    return record


def quantize_run(run_dir: str | Path, out_dir: str | Path, bits: int, group_size: int = 64, search: bool = True,
                 head_bits: int | None = None) -> dict:
    """Read a run directory, quantize its Linear layers and write a quantized run directory
    (atomically). Returns a report: sizes on disk and of the Linear weights in memory.
    head_bits: an untied head's own width (`quantize_model`; None: 8 in an int4 run)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out_dir} is the input run directory; choose a new directory")
    if not run_dir.is_dir():
        raise FileNotFoundError(2, "run directory not found", str(run_dir))
    if (run_dir / QUANT_CONFIG_NAME).is_file():
        raise ValueError(f"{run_dir} is already quantized ({read_quant_record(run_dir)['bits']} bits)")
    if not (run_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(2, "tokenizer.json missing in run directory (is it a finished run?)", str(run_dir / "tokenizer.json"))
    model = load_pretrained(run_dir).float()
    fp32_linear = linear_weight_bytes(model)[1]
    quantize_model(model, bits, group_size, search, head_bits)
    q_linear = linear_weight_bytes(model)[0]
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    record = model.quantization
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lmforge": "1", "quantization": json.dumps(record)})
        model.config.save(tmp / "config.json")
        atomic_write_json(tmp / QUANT_CONFIG_NAME, record)
        shutil.copy2(run_dir / "tokenizer.json", tmp / "tokenizer.json")
    return {
        "bits": bits,
        "group_size": record["group_size"],
        "module_bits": record.get("module_bits", {}),
        "modules": len(record["modules"]),
        "disk_bytes_in": (run_dir / "model.safetensors").stat().st_size,
        "disk_bytes_out": (out_dir / "model.safetensors").stat().st_size,
        "linear_bytes_fp32": fp32_linear,
        "linear_bytes_quantized": q_linear,
        "linear_fraction": q_linear / fp32_linear,
    }


def load_quantized(run_dir: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """Build the model of a quantized run directory: QuantLinear where quantization.json says
    (through model_from_state_dict, which checks every tensor's name and shape)."""
    run_dir = Path(run_dir)
    record = read_quant_record(run_dir)
    bits, group_size, modules = record["bits"], record.get("group_size") or 64, record["modules"]
    module_bits = record.get("module_bits") or {}
    if not isinstance(module_bits, dict) or any(b not in (4, 8) or m not in modules for m, b in module_bits.items()):
        raise ValueError(f"{run_dir / QUANT_CONFIG_NAME}: module_bits must map quantized module names to 8 or 4, got {module_bits!r}")
    config = ModelConfig.load(run_dir / "config.json")
    weights = run_dir / "model.safetensors"
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None

    def quantized_layers(model):  # on the meta device, before the weights are materialised
        for name in modules:
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{run_dir / QUANT_CONFIG_NAME}: module {name!r} is not in the model") from None
            _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, module_bits.get(name, bits), group_size,
                                                 bias=lin.bias is not None))

    model = model_from_state_dict(config, tensors, f"{weights} (with {QUANT_CONFIG_NAME})", device, prepare=quantized_layers)
    if dtype is not None:  # activations, norms and embeddings; quantized weights keep their dtype
        for m in model.modules():
            if not isinstance(m, QuantLinear):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(dtype)
    model.quantization = record
    return model.eval()
