"""Fused low-precision kernels for `QuantLinear` layers, chosen per layer shape by timing them once.

`QuantLinear`'s own forward (the reference) unpacks its weight to floats for every matmul: exact
for the stored weights, but it reads and writes more bytes than an fp32 matmul, so a quantized
model decoded slower than fp32. The kernels here compute on the low-precision weight itself:

- `int8_dynamic` (CPU, W8A8): `torch.ops.quantized.linear_dynamic` on an FBGEMM / oneDNN
  prepacked weight (PyTorch's x86 engine). The per-channel int8 weight is the stored one
  (q, scale): nothing is re-quantized. The activations are quantized per call, per tensor, to
  uint8 (8 bits where the CPU has VNNI, else 7: `reduce_range`, against int16 saturation); that
  rounding is its only difference from the reference (about 1-4% relative output error, more
  with outlier activations). The prepacked weight replaces the layer's `qweight` buffer
  (`QuantLinear.set_kernel`), so the model keeps its memory saving.
- `int8_weight_only` (CPU and GPU): `torch._weight_int8pack_mm` on the stored int8 weight (no
  copy), activations in float.
- `int4_tinygemm` (CPU): `torch._weight_int4pack_mm_for_cpu` on a repacked copy of the int4
  weight (same values: zero = minimum + 8 * scale), activations and scales rounded to bf16 (the
  op's fast path). The repacked weight replaces the layer's `qweight` (its layout, a permutation
  of the nibbles, is read back from the op, so `state_dict()` unpacks it exactly).

`choose_kernels(model)` groups the layers by shape, times the reference and each kernel that
applies on the model's own layers of that shape (batch 1, the decode step), checks the kernel's
output against the reference, and installs the fastest; choices are cached per shape, thread
count and device for the process. The environment variable LMFORGE_QUANT_KERNEL (or `mode`)
overrides: `auto` (default), `reference`, `fused` (the first fused kernel that applies) or a
kernel name. The engine calls it for quantized models, and gives a tied fp32 head an int8
decode copy (`head_kernel`). Measurements and choices: docs/quantization.md.
"""

from __future__ import annotations

import os
import time
import warnings
from functools import lru_cache

import torch
import torch.nn as nn

from lmforge.infer.cpu_matmul import DecodeMatmul
from lmforge.infer.quantize import QuantLinear, pack_int4, quantize_int8, unpack_int4

KERNEL_ENV = "LMFORGE_QUANT_KERNEL"
MODES = ("auto", "reference", "fused")
PREFILL_ROWS = 64  # a chosen kernel must not be slower than the reference for prompts of this many tokens either
MAX_REL_ERROR = 0.05  # a kernel whose output differs more from the reference on N(0, 1) inputs is not used
_CHOICES: dict[tuple, str] = {}  # (kernel names, shape, threads, device) -> chosen name


@lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products into int32 without int16 saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def _quantized_engine_ready() -> bool:
    engines = torch.backends.quantized.supported_engines
    if "x86" in engines or "fbgemm" in engines:
        if torch.backends.quantized.engine not in ("x86", "fbgemm", "onednn"):
            torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
        return True
    return False


class Int8Dynamic:
    """W8A8 dynamic quantized matmul on a prepacked copy of the layer's int8 weight (CPU)."""

    name = "int8_dynamic"
    replaces_qweight = True  # the packed weight is the layer's only copy; `qweight()` unpacks it

    @staticmethod
    def applies(layer: QuantLinear) -> bool:
        return layer.bits == 8 and layer.scale.device.type == "cpu" and _quantized_engine_ready()

    def __init__(self, layer: QuantLinear):
        q = layer.int_weight()
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch.ao's quantized tensors are marked deprecated in 2.13; the kernel is current
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, layer.scale.double(), zero, 0)
            bias = None if layer.bias is None else layer.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.reduce_range = not cpu_has_vnni()
        self.out_features, self.nbytes = layer.out_features, q.numel() + 4 * q.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, self.reduce_range)  # (rows, O)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def qweight(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, _ = torch.ops.quantized.linear_unpack(self.packed)
            return w.int_repr()  # (O, I) int8, exactly the stored values


class Int8WeightOnly:
    """x @ (q * scale)^T through `torch._weight_int8pack_mm`, reading the layer's own int8 weight."""

    name = "int8_weight_only"
    replaces_qweight = False

    @staticmethod
    def applies(layer: QuantLinear) -> bool:
        return layer.bits == 8 and hasattr(torch, "_weight_int8pack_mm")

    def __init__(self, layer: QuantLinear):
        self.layer, self.nbytes = layer, 0  # no copy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x2 = x.reshape(-1, x.shape[-1])
        y = torch._weight_int8pack_mm(x2, layer.qweight, layer.scale.to(x2.dtype))  # (rows, O)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.view(*x.shape[:-1], layer.out_features)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 tensor -> its nibbles, flat, low nibble first (int32)."""
    t = packed.reshape(-1).to(torch.int32)
    return torch.stack([t & 15, t >> 4], -1).reshape(-1)


def _int4pack_sources(O: int, I: int) -> torch.Tensor:
    """For each nibble of `torch._convert_weight_to_int4pack_for_cpu`'s output for an (O, I)
    weight, the flat index o * I + i of the weight value it holds. The op's layout is a fixed
    permutation of the values (a blocked layout for its vector units), undocumented; it is read
    back from the op itself by packing the indices' hexadecimal digits one at a time."""
    index = torch.arange(O * I, dtype=torch.int32)
    sources = torch.zeros(O * I, dtype=torch.int32)
    for j in range(max(1, ((O * I - 1).bit_length() + 3) // 4)):
        digit = ((index >> (4 * j)) & 15).view(O, I)
        sources |= _nibbles(torch._convert_weight_to_int4pack_for_cpu(digit, 1)) << (4 * j)
    return sources


class Int4Tinygemm:
    """Group-wise int4 matmul through `torch._weight_int4pack_mm_for_cpu` on a repacked copy."""

    name = "int4_tinygemm"
    replaces_qweight = True  # the repacked weight is the layer's only copy; `qweight()` unpacks it exactly

    @staticmethod
    def applies(layer: QuantLinear) -> bool:
        return (layer.bits == 4 and layer.scale.device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu")
                and layer.in_features % 64 == 0 and layer.out_features % 16 == 0)

    def __init__(self, layer: QuantLinear):
        self.packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(layer.int_weight()).to(torch.int32), 1)
        # tinygemm dequantizes (q - 8) * scale + zero; the stored form is q * scale + minimum
        scales_zeros = torch.stack([layer.scale.t(), (layer.minimum + 8 * layer.scale).t()], -1)  # (G, O, 2)
        # In bf16: the CPU op's vectorized path is the bf16 one (24x faster than fp32 activations at
        # one row on an AVX-512 Xeon, docs/quantization.md); the rounding costs ~0.3% relative output error.
        self.scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()
        self.layer, self.nbytes = layer, self.packed.numel() + self.scales_zeros.numel() * 2

    def qweight(self) -> torch.Tensor:
        """The layer's stored form, (O, I/2) uint8 (`pack_int4`), exactly, from the repacked copy."""
        O, I = self.layer.out_features, self.layer.in_features
        q = torch.empty(O * I, dtype=torch.int32)
        q[_int4pack_sources(O, I).long()] = _nibbles(self.packed)
        return pack_int4(q.view(O, I))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, layer.group_size, self.scales_zeros).to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.view(*x.shape[:-1], layer.out_features)


KERNELS = (Int8Dynamic, Int8WeightOnly, Int4Tinygemm)  # in order of preference for mode "fused"


def kernel_mode(mode: str | None = None) -> str:
    """The mode asked for (argument, else $LMFORGE_QUANT_KERNEL, else auto), checked."""
    mode = mode or os.environ.get(KERNEL_ENV) or "auto"
    names = MODES + tuple(k.name for k in KERNELS)
    if mode not in names:
        source = "mode" if mode != os.environ.get(KERNEL_ENV) else f"${KERNEL_ENV}"
        raise ValueError(f"{source}={mode!r}: expected one of {', '.join(names)}")
    return mode


def _time_per_layer(fn, layers: list, x: torch.Tensor, repeats: int = 5) -> float:
    """Fastest of `repeats` passes over `layers` (the model's own layers, in turn), seconds per layer."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)  # GPU kernels run asynchronously
    with torch.inference_mode():
        for layer in layers[:1]:
            fn(layer, x)  # warm-up (first-call allocations)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            for layer in layers:
                fn(layer, x)
            sync()
            best = min(best, time.perf_counter() - t)
    return best / len(layers)


def _measure(layers: list[QuantLinear], kernels: list, rows: int) -> tuple[str, dict]:
    """Time the reference and each kernel on up to 4 of `layers` at `rows` rows (decoding) and at
    PREFILL_ROWS (a prompt: the same kernel serves both); the kernel fastest at `rows` among
    those that agree with the reference within MAX_REL_ERROR and are not slower than it at
    PREFILL_ROWS. Returns (name, {name: microseconds per layer at rows, "name@64": ...})."""
    sample = layers[:4]
    gen = torch.Generator().manual_seed(0)
    device = sample[0].scale.device
    xs = {n: torch.randn(n, sample[0].in_features, generator=gen).to(device) for n in (rows, PREFILL_ROWS)}
    times = {"reference": _time_per_layer(lambda layer, x: layer.reference_forward(x), sample, xs[rows])}
    with torch.inference_mode():
        ref = sample[0].reference_forward(xs[rows])
    big_ref = None
    for kernel in kernels:
        try:  # a kernel may refuse a shape its `applies` did not foresee: then it is not a candidate
            built = {id(layer): kernel(layer) for layer in sample}
            with torch.inference_mode():
                err = float((built[id(sample[0])](xs[rows]) - ref).norm() / ref.norm().clamp(min=1e-12))
        except RuntimeError:
            continue
        if err > MAX_REL_ERROR:
            continue
        t = _time_per_layer(lambda layer, x: built[id(layer)](x), sample, xs[rows])
        if t >= times["reference"]:
            times[kernel.name] = t
            continue
        if big_ref is None:
            big_ref = _time_per_layer(lambda layer, x: layer.reference_forward(x), sample[:1], xs[PREFILL_ROWS], repeats=2)
            times[f"reference@{PREFILL_ROWS}"] = big_ref
        big = _time_per_layer(lambda layer, x: built[id(layer)](x), sample[:1], xs[PREFILL_ROWS], repeats=2)
        times[f"{kernel.name}@{PREFILL_ROWS}"] = big
        times[kernel.name] = t if big <= big_ref else float("inf")  # a kernel that would slow prompts down: not used
    best = min((n for n in times if "@" not in n), key=times.get)
    return best, {name: round(1e6 * t, 1) for name, t in times.items() if t != float("inf")}


def choose_kernels(model: nn.Module, mode: str | None = None, rows: int = 1) -> list[dict]:
    """Install a kernel in every QuantLinear of `model`: per distinct (bits, in, out, group,
    bias, device) the fastest at `rows` rows (measured once per process) or what `mode` says.
    Then fuses each block's int8 q/k/v and gate/up into one matrix where that is faster
    (`fuse_projections`), and gives a tied fp32 head an int8 decode copy (`head_kernel`) unless
    mode is reference.
    Returns one record per shape: {"shape", "layers", "kernel", "us"} (us: measured times)."""
    mode = kernel_mode(mode)
    unfuse_projections(model)
    groups: dict[tuple, list[QuantLinear]] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            key = (m.bits, m.in_features, m.out_features, m.group_size if m.bits == 4 else None, m.bias is not None,
                   m.scale.device.type)
            groups.setdefault(key, []).append(m)
    report = []
    for key, layers in groups.items():
        report.append(_choose_group(key, layers, mode, rows))
    report += fuse_projections(model, mode, rows)
    head = install_head_kernel(model, mode, rows) if groups else None
    if head is not None:
        report.append(head)
    return report


def _choose_group(key: tuple, layers: list[QuantLinear], mode: str, rows: int) -> dict:
    kernels = [k for k in KERNELS if k.applies(layers[0])]
    us: dict = {}
    if mode == "reference" or not kernels:
        name = "reference"
    elif mode == "fused":
        name = kernels[0].name
    elif mode != "auto":
        if mode not in [k.name for k in kernels]:
            raise ValueError(f"{KERNEL_ENV}={mode}: kernel does not apply to {key[0]}-bit layers on {key[-1]}")
        name = mode
    else:
        cache_key = (tuple(k.name for k in kernels), key, rows, torch.get_num_threads())
        if cache_key not in _CHOICES:
            for layer in layers:  # back to the stored weight: the reference is what kernels are timed and checked against
                layer.set_kernel(None)
            _CHOICES[cache_key], us = _measure(layers, kernels, rows)
        name = _CHOICES[cache_key]
    kernel = next((k for k in kernels if k.name == name), None)
    for layer in layers:
        if kernel is None or not isinstance(layer.kernel, kernel):  # a second engine on the model keeps what it has
            layer.set_kernel(None if kernel is None else kernel(layer))
    bits, I, O, group, bias, device = key
    return {"shape": f"int{bits} {I}->{O}" + (f" g{group}" if group else "") + (" +bias" if bias else ""),
            "layers": len(layers), "kernel": name, "us": us}


class FusedInt8:
    """One prepacked int8 matrix for sibling layers that read the same input (a block's q/k/v,
    or gate/up): `fused(x)` -> one output per layer, views of a single W8A8 product. The stacked
    rows are the layers' own (q, scale, bias): per-output-channel scales make the concatenation
    exact, so each part equals its layer's `int8_dynamic` product (up to the activations'
    rounding, whose range now spans the siblings' common input: the same input, so the same
    scale). It is the layers' only weight copy: each becomes a `FusedPart` of it."""

    name = "int8_dynamic (fused)"

    def __init__(self, layers: list[QuantLinear]):
        q = torch.cat([layer.int_weight() for layer in layers])
        scale = torch.cat([layer.scale for layer in layers])
        biased = [layer.bias is not None for layer in layers]
        if any(biased) and not all(biased):
            raise ValueError("fused layers must all have a bias or none")
        bias = torch.cat([layer.bias.detach().float() for layer in layers]) if all(biased) else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.reduce_range = not cpu_has_vnni()
        self.sizes = [layer.out_features for layer in layers]
        self.bounds = [sum(self.sizes[:i]) for i in range(len(layers) + 1)]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), self.packed, self.reduce_range)
        y = y.to(x.dtype).view(*x.shape[:-1], self.bounds[-1])
        return y.split(self.sizes, -1)

    def qweight(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, _ = torch.ops.quantized.linear_unpack(self.packed)
            return w.int_repr()


class FusedPart:
    """A fused layer's kernel: its rows of a `FusedInt8`. Called alone it computes every
    sibling's product and keeps its own (correct, not fast: the block calls the fused matrix
    through its hook); `qweight()` unpacks its rows for `state_dict()`."""

    name = "int8_dynamic (fused)"
    replaces_qweight = True

    def __init__(self, fused: FusedInt8, index: int):
        self.fused, self.index = fused, index
        self.nbytes = 0  # counted once, in the fused matrix

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[self.index]

    def qweight(self) -> torch.Tensor:
        lo, hi = self.fused.bounds[self.index], self.fused.bounds[self.index + 1]
        return self.fused.qweight()[lo:hi].clone()


def _sibling_groups(model: nn.Module) -> list[tuple[nn.Module, str, list]]:
    """(module, hook name, layers) for every attention's q/k/v and SwiGLU/GeGLU MLP's gate/up
    whose layers are all int8 QuantLinear layers on the CPU."""
    groups = []
    for m in model.modules():
        if hasattr(type(m), "fused_qkv"):
            groups.append((m, "fused_qkv", [m.q_proj, m.k_proj, m.v_proj]))
        elif hasattr(type(m), "fused_gate_up") and getattr(m, "activation", "gelu") != "gelu":
            groups.append((m, "fused_gate_up", [m.gate_proj, m.up_proj]))
    return [(m, hook, layers) for m, hook, layers in groups
            if all(type(layer) is QuantLinear and Int8Dynamic.applies(layer) for layer in layers)]


def unfuse_projections(model: nn.Module) -> None:
    """Undo `fuse_projections`: every fused layer gets its own weight back (the reference path)."""
    for m in model.modules():
        for hook in ("fused_qkv", "fused_gate_up"):
            if m.__dict__.get(hook) is not None:
                setattr(m, hook, None)
    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.kernel, FusedPart):
            m.set_kernel(None)


def fuse_projections(model: nn.Module, mode: str = "auto", rows: int = 1) -> list[dict]:
    """Give each block's int8 q/k/v (and gate/up) one fused matrix (`FusedInt8`) through the
    model's `fused_qkv` / `fused_gate_up` hooks, where that is faster (auto: timed once per
    shape against the layers' installed kernels, at `rows` rows and PREFILL_ROWS, and checked
    against the reference within MAX_REL_ERROR) or where mode asks for fused kernels (`fused`,
    `int8_dynamic`). Memory is unchanged: the fused matrix replaces the layers' own."""
    if mode not in ("auto", "fused", Int8Dynamic.name):
        return []
    by_shape: dict[tuple, list] = {}
    for m, hook, layers in _sibling_groups(model):
        key = (hook, tuple((layer.in_features, layer.out_features, layer.bias is not None) for layer in layers))
        by_shape.setdefault(key, []).append((m, layers))
    report = []
    for (hook, shapes), members in by_shape.items():
        us: dict = {}
        cache_key = ("fused", hook, shapes, rows, torch.get_num_threads())
        if mode != "auto":
            fuse = True
        else:
            if cache_key not in _CHOICES:
                _CHOICES[cache_key], us = _measure_fusion(members[:4], rows)
            fuse = _CHOICES[cache_key]
        if fuse:
            for m, layers in members:
                fused = FusedInt8(layers)
                for i, layer in enumerate(layers):
                    layer.set_kernel(FusedPart(fused, i))
                setattr(m, hook, fused)
        what = "q/k/v" if hook == "fused_qkv" else "gate/up"
        report.append({"shape": f"int8 {what} {shapes[0][0]}->{'+'.join(str(o) for _, o, _ in shapes)}",
                       "layers": len(members), "kernel": FusedInt8.name if fuse else "separate", "us": us})
    return report


def _measure_fusion(members: list, rows: int) -> tuple[bool, dict]:
    """Whether one fused product beats the layers' own kernels at `rows` rows without being
    slower at PREFILL_ROWS, and agrees with the reference; the times in microseconds, named as
    `_measure` names them ("separate", FusedInt8.name, and the same "@64")."""
    layers0 = members[0][1]
    fused = [FusedInt8(layers) for _, layers in members]
    gen = torch.Generator().manual_seed(0)
    times: dict = {}
    for n, suffix in ((rows, ""), (PREFILL_ROWS, f"@{PREFILL_ROWS}")):
        x = torch.randn(n, layers0[0].in_features, generator=gen)
        times["separate" + suffix] = _time_per_layer(lambda ls, x: [layer(x) for layer in ls], [ls for _, ls in members], x)
        times[FusedInt8.name + suffix] = _time_per_layer(lambda f, x: f(x), fused, x)
        if n == rows:
            with torch.inference_mode():
                for layer, part in zip(layers0, fused[0](x)):
                    ref = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
                    if float((part - ref).norm() / ref.norm().clamp(min=1e-12)) > MAX_REL_ERROR:
                        return False, {}
    slower_on_prompts = times[FusedInt8.name + f"@{PREFILL_ROWS}"] > times[f"separate@{PREFILL_ROWS}"]
    fuse = times[FusedInt8.name] < times["separate"] and not slower_on_prompts
    return fuse, {name: round(1e6 * t, 1) for name, t in times.items() if not (slower_on_prompts and name == FusedInt8.name)}


class HeadKernel:
    """The `decode_matmul` hook of a tied fp32 head in a quantized model: products without
    gradients read an int8 copy of the head (per vocabulary row, as int8 quantize would store
    it) through `Int8Dynamic`, rebuilt whenever the embedding changes. The head is the widest
    matrix of small models (a quarter of Qwen2.5-0.5B's weights) and the embedding lookups
    need the fp32 table, so the copy costs 1 byte per head weight (+ V * 4 for scales)."""

    name = "int8_dynamic (head copy)"

    def __init__(self, layer: nn.Linear, fallback=None):
        self.fallback, self._stamp, self.kernel = fallback, None, None
        self._build(layer)

    def _build(self, layer: nn.Linear) -> None:
        w = layer.weight
        tmp = QuantLinear(layer.in_features, layer.out_features, 8, device="meta")
        tmp.qweight, tmp.scale = quantize_int8(w.detach())
        tmp.bias = None
        self.kernel = None
        self.kernel = Int8Dynamic(tmp)  # the int8 qweight is dropped with tmp; the packed copy stays
        self.nbytes, self._stamp = self.kernel.nbytes, (w.data_ptr(), w._version)

    def __call__(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if x.device.type != "cpu" or layer.bias is not None:
            return self.fallback(layer, x) if self.fallback is not None else nn.functional.linear(x, w, layer.bias)
        if (w.data_ptr(), w._version) != self._stamp:
            self._build(layer)
        return self.kernel(x)


def install_head_kernel(model: nn.Module, mode: str, rows: int = 1) -> dict | None:
    """For a quantized model whose head is a plain fp32 Linear tied to the embedding: install
    HeadKernel where it is faster than the fp32 product (auto, measured once per shape) or where
    mode asks for fused kernels. Returns a report record, or None when there is nothing to do."""
    head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if not tied or type(head) is QuantLinear or not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        return None
    if not head.weight.is_floating_point() or head.bias is not None:
        return None
    fallback = getattr(head, "decode_matmul", None)
    if isinstance(fallback, HeadKernel):
        fallback = fallback.fallback
    if isinstance(fallback, DecodeMatmul) and fallback.transposed:
        # the int8 copy is the head's decode path: no transposed fp32 copy (as much memory as the head) beside it
        fallback = DecodeMatmul(transposed=False)
    shape = f"tied head {head.in_features}->{head.out_features}"
    if mode == "reference" or not _quantized_engine_ready():
        head.decode_matmul = getattr(head, "decode_matmul", None) if not isinstance(head.decode_matmul, HeadKernel) else fallback
        return {"shape": shape, "layers": 1, "kernel": "reference", "us": {}}
    kernel = HeadKernel(head, fallback)
    us: dict = {}
    if mode == "auto":
        cache_key = ("head", head.in_features, head.out_features, rows, torch.get_num_threads())
        if cache_key not in _CHOICES:
            x = torch.randn(rows, head.in_features, generator=torch.Generator().manual_seed(0))
            plain = fallback or (lambda layer, x: nn.functional.linear(x, layer.weight))
            t_ref = _time_per_layer(lambda layer, x: plain(layer, x), [head], x, repeats=3)
            t_int8 = _time_per_layer(lambda layer, x: kernel(layer, x), [head], x, repeats=3)
            _CHOICES[cache_key] = kernel.name if t_int8 < t_ref else "reference"
            us = {"reference": round(1e6 * t_ref, 1), kernel.name: round(1e6 * t_int8, 1)}
        if _CHOICES[cache_key] == "reference":
            head.decode_matmul = fallback
            return {"shape": shape, "layers": 1, "kernel": "reference", "us": us}
    head.decode_matmul = kernel
    return {"shape": shape, "layers": 1, "kernel": kernel.name, "us": us}


def kernel_bytes(model: nn.Module) -> int:
    """Bytes the installed kernels hold beyond the model's own tensors (copies that do not
    replace a weight: the tied head's int8 copy)."""
    total = 0
    for m in model.modules():
        k = getattr(m, "kernel", None) if isinstance(m, QuantLinear) else getattr(m, "decode_matmul", None)
        if k is not None and not getattr(k, "replaces_qweight", False):
            total += getattr(k, "nbytes", 0)
    return total


__all__ = ["KERNEL_ENV", "KERNELS", "MODES", "Int8Dynamic", "Int8WeightOnly", "Int4Tinygemm", "FusedInt8", "FusedPart",
           "HeadKernel", "choose_kernels", "fuse_projections", "unfuse_projections", "install_head_kernel", "kernel_bytes", "kernel_mode", "cpu_has_vnni"]
