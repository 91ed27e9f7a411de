"""Where a training step gets its teachers' outputs from: live frozen teachers, or (``mtkd_fast.cache``) a
teacher-output cache. Both implement the :class:`TeacherSource` protocol, so the trainer does not care which.

:class:`LiveTeachers` is a frozen-teacher inference engine: reduced precision where the device computes it fast,
BatchNorm folded into the preceding convolutions, optional ``torch.compile``, channels_last, and on CUDA a side
stream so the teachers' forward overlaps the student's.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sys
import warnings
from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TeacherOutputs", "TeacherSource", "LiveTeachers", "PRECISIONS", "AUTO_FP32_STRATEGIES",
           "resolve_precision", "cpu_has_fast_bf16", "fold_batchnorm"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TeacherOutputs(NamedTuple):
    """What one batch needs from the M teachers (docs/method.md section 1)."""

    logits: Tensor  # [M, B, K]
    embeddings: list[Tensor]  # M tensors [B, D_m] (feats[-1], the pooled embedding)
    feature_maps: list[Tensor]  # M tensors [B, C_m, H_m, W_m] (feats[-2], the last feature map)


class TeacherSource(Protocol):
    """Gives the teachers' outputs for a batch.

    ``images`` is the augmented batch as the student sees it, ``indices`` the dataset indices of its samples
    and ``view`` the augmentation view it was made with (see ``mtkd_fast.data``): a cache looks outputs up by
    (index, view), live teachers run on the images.
    """

    num_teachers: int

    def __call__(self, images: Tensor, indices: Tensor, view: int) -> TeacherOutputs: ...


# ---- precision ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX): oneDNN then runs bf16 convolutions
    about twice as fast as float32. Read from torch's CPU capability and the kernel's CPU flags."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in cap:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


# Strategies for which "auto" keeps float32 teachers: only those a paired non-inferiority study showed bf16 teachers
# to harm (mean paired difference below zero by more than two standard errors; docs/training.md "Teacher
# precision", tools/precision_study.py). MTKD-RL: -0.68 +- 0.31 points over 5 paired seeds on the demo's setting.
AUTO_FP32_STRATEGIES: tuple[str, ...] = ("mtkd_rl",)


def resolve_precision(precision: str, device, strategy: str | None = None) -> str:
    """The teachers' compute precision, "fp32", "bf16" or "fp16": the one policy train, cache build, the
    benchmarks and the demo share.

    ``precision`` is the user's choice: "fp32" / "bf16" / "fp16" are taken as given ("fp16" on a CPU is an error:
    no fast fp16 convolutions there). "auto" is "fp32" for a ``strategy`` in :data:`AUTO_FP32_STRATEGIES`;
    otherwise "bf16" on a CPU with AVX512-BF16 or AMX and on a CUDA device of compute capability 8.0 or newer
    (native bf16), "fp32" elsewhere. ``strategy=None`` (not known: a teacher cache, which serves every strategy,
    or the engine used on its own) gets the precision every strategy's "auto" accepts: "fp32" while any strategy
    keeps it, else the device's.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision: 'fp16' is not supported for teachers on a CPU (--teacher-precision); "
                         "use 'bf16' or 'fp32'")
    if precision != "auto":
        return precision
    if _keeps_fp32(strategy):
        return "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return "fp32"


def _keeps_fp32(strategy: str | None) -> bool:
    return strategy in AUTO_FP32_STRATEGIES or (strategy is None and bool(AUTO_FP32_STRATEGIES))


def _precision_reason(precision: str, used: str, device: torch.device, strategy: str | None = None) -> str:
    if precision != "auto":
        return "requested"
    if _keeps_fp32(strategy):
        return (f"auto: fp32 for strategy {strategy!r}: bf16 teachers cost it accuracy (docs/training.md)" if strategy
                else f"auto: fp32 with no strategy given, as {list(AUTO_FP32_STRATEGIES)} keep it")
    if device.type == "cpu":
        return "auto: CPU has native bf16 (AVX512-BF16/AMX)" if used == "bf16" else "auto: CPU has no native bf16"
    if device.type == "cuda":
        return f"auto: CUDA compute capability {'>=' if used == 'bf16' else '<'} 8.0"
    return f"auto: {device.type}"


# ---- BatchNorm folding -------------------------------------------------------------------------------------------

def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch-norm name) pairs where the BatchNorm's only input is the convolution's output, the
    convolution's output goes nowhere else, and each module is called once (found by tracing the forward)."""
    import torch.fx

    class BatchNormLeaves(torch.fx.Tracer):  # a BatchNorm subclass (timm's BatchNormAct2d) is one call too
        def is_leaf_module(self, m, qualname):
            return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)

    try:
        graph = BatchNormLeaves().trace(model, concrete_args={"is_feat": True})
    except Exception:  # noqa: BLE001 - data-dependent control flow: only what nn.Sequential guarantees
        return _sequential_pairs(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if (isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1 and bn.running_mean is not None
                and bn.num_features == conv.out_channels):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batch norm) adjacent in a plain nn.Sequential: its forward feeds the convolution's output to the
    next module only. Modules registered more than once (shared) are skipped."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs = []
    for name, seq in model.named_modules():
        if type(seq).forward is not nn.Sequential.forward or not isinstance(seq, nn.Sequential):
            continue
        items = list(seq._modules.items())
        for (a, conv), (b, bn) in zip(items, items[1:]):
            if (isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed
                    and isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
                    and bn.num_features == conv.out_channels and counts[id(conv)] == 1 and counts[id(bn)] == 1
                    and not conv._forward_hooks and not bn._forward_pre_hooks):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) with every BatchNorm that directly follows a convolution folded into
    that convolution's weight and bias (the BatchNorm becomes an identity; a subclass that does more, such as
    timm's BatchNormAct2d with its activation, keeps that part after an identity normalisation). Exact up to
    rounding, since frozen teachers use the running statistics. Returns (the copy, how many BatchNorms were
    folded); ``model`` is left untouched."""
    folded = copy.deepcopy(model).eval()
    pairs = _conv_bn_pairs(folded)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        w = conv.weight
        mean, var = bn.running_mean.double(), bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        new_b = ((bias - mean) * scale + beta).to(w.dtype)
        conv.weight = nn.Parameter(new_w, requires_grad=False)
        conv.bias = nn.Parameter(new_b, requires_grad=False)
        folded.set_submodule(bn_name, _after_norm(bn))
    return folded, len(pairs)


def _after_norm(bn: nn.Module) -> nn.Module:
    """What stays of a BatchNorm folded into its convolution: nothing for torch's own; timm's BatchNormAct2d
    (whose forward is: normalise, ``self.drop``, ``self.act``) its dropout and activation; any other subclass,
    which may do more after the normalisation, the module itself with a normalisation that is exactly the
    identity (correct, but its normalisation still runs)."""
    if type(bn).forward is nn.modules.batchnorm._BatchNorm.forward:
        return nn.Identity()
    norm_act = sys.modules.get("timm.layers.norm_act")  # imported wherever a model holds its layers
    if norm_act is not None and type(bn) is getattr(norm_act, "BatchNormAct2d", None):
        return nn.Sequential(bn.drop, bn.act)  # faster than an identity norm: docs/models.md, "LiveTeachers"
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    if bn.weight is not None:
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    return bn


# ---- compile -----------------------------------------------------------------------------------------------------

def _compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run the teachers here, or None."""
    try:
        import torch._dynamo
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile is not importable ({exc})"
    if device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        return "no C++ compiler for inductor's CPU code"
    if device.type not in ("cpu", "cuda"):
        return f"no inductor backend for device {device.type!r}"
    return None


def _compile(model: nn.Module, device: torch.device):
    if device.type == "cuda":  # CUDA graphs: a small network's launch overhead is most of its inference time
        return torch.compile(model, mode="reduce-overhead", dynamic=False)
    return torch.compile(model, dynamic=False, options={"freezing": True})  # weights become constants


# ---- asynchronous outputs (CUDA side stream) ---------------------------------------------------------------------

class _PendingOutputs(TeacherOutputs):
    """TeacherOutputs computed on the teachers' CUDA stream. The first read of any field makes the reading
    (current) stream wait for the teachers' work and marks the tensors as used on it, so the caching allocator
    does not hand their memory to the teachers' stream while the reader may still use them."""

    def __new__(cls, logits, embeddings, feature_maps, event=None):
        self = super().__new__(cls, logits, embeddings, feature_maps)
        self._event = event
        return self

    def ready(self) -> TeacherOutputs:
        if self._event is not None:
            stream = torch.cuda.current_stream(self._event_device())
            stream.wait_event(self._event)
            logits, embeddings, maps = tuple.__iter__(self)
            for t in [logits, *embeddings, *maps]:
                t.record_stream(stream)
            self._event = None
        return TeacherOutputs(*tuple.__iter__(self))

    def _event_device(self):
        return tuple.__getitem__(self, 0).device

    logits = property(lambda self: self.ready().logits)
    embeddings = property(lambda self: self.ready().embeddings)
    feature_maps = property(lambda self: self.ready().feature_maps)

    def __iter__(self):
        return iter(self.ready())

    def __getitem__(self, i):
        return self.ready()[i]


def ready(outputs: TeacherOutputs) -> TeacherOutputs:
    """``outputs`` safe to use on the current stream (waits for the teachers' stream if they ran on one)."""
    return outputs.ready() if isinstance(outputs, _PendingOutputs) else outputs


def _has_version(t: Tensor) -> bool:
    """An inference-mode tensor has no version counter (and cannot be edited in place outside inference mode)."""
    return not t.is_inference()


# ---- the engine --------------------------------------------------------------------------------------------------

class LiveTeachers(nn.Module):
    """Runs M frozen teachers (eval mode, no gradients, inference mode) on each batch, fast.

    Args:
        teachers: the M teacher models; each returns ``(feats, logits)`` when called with ``is_feat=True``.
            They are set to eval mode and frozen, otherwise left untouched (folding and compiling act on copies);
            ``self.teachers`` holds them (the cache hashes their weights). The copies follow them: a changed
            weight (``live.teachers[0].load_state_dict(new)``, an in-place edit) is seen before the next run and
            the copies are rebuilt (:meth:`refresh`), so the outputs are always the current weights'.
        precision: compute precision, "fp32" | "bf16" | "fp16" | "auto" (see :func:`resolve_precision`); bf16 and
            fp16 run the teachers under autocast. The outputs are float32 whatever the compute precision.
            ``precision_used`` says what was picked.
        strategy: the distillation strategy the teachers serve, for ``precision="auto"``
            (:func:`resolve_precision`); None: not known, the precision every strategy accepts.
        fold_bn: fold every BatchNorm that directly follows a convolution into that convolution (exact up to
            rounding). ``folded_bn`` counts the folded layers.
        compile: ``torch.compile`` the teachers for inference: inductor with freezing on a CPU, CUDA graphs
            ("reduce-overhead") on CUDA. Where compile is unavailable or fails, the teachers run eagerly and a
            RuntimeWarning says why.
        channels_last: run the teachers on channels_last (NHWC) tensors. Default (None): on, except for
            float32 with ``fold_bn=False``, which runs the teachers exactly as given (bit for bit the float32
            eager outputs: NHWC convolutions sum in another order).
            Its speed on the CIFAR teacher pool is in benchmarks/RESULTS.md ("The teacher engine"); on CUDA,
            NHWC is what tensor-core convolutions take (not measured here). Folding, channels_last and compile
            run on copies of the teachers: their weights are held twice.
        overlap: on CUDA, run the teachers on their own stream so they overlap whatever the caller enqueues next
            (the student's forward); the returned outputs wait for that stream when first read. Default True.
        autocast_dtype: older spelling of ``precision`` (torch.bfloat16 / torch.float16 / None for float32).
    """

    def __init__(self, teachers: Sequence[nn.Module], precision: str = "auto", fold_bn: bool = True,
                 compile: bool = False, channels_last: bool | None = None, overlap: bool = True, *,
                 autocast_dtype: torch.dtype | None | str = "unset", strategy: str | None = None):
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"teachers: expected at least 2 teacher models, got {len(teachers)}")
        if autocast_dtype != "unset":
            legacy = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
            if autocast_dtype not in legacy:
                raise ValueError("autocast_dtype: expected None, torch.bfloat16 or torch.float16, "
                                 f"got {autocast_dtype!r}")
            if precision != "auto" and precision != legacy[autocast_dtype]:
                raise ValueError(f"precision: {precision!r} contradicts autocast_dtype={autocast_dtype}; give one")
            precision = legacy[autocast_dtype]
        self.teachers = nn.ModuleList(teachers)
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        p = next((p for t in self.teachers for p in t.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        self.precision, self.strategy = precision, strategy
        self.precision_used = resolve_precision(precision, device, strategy)
        self.precision_reason = _precision_reason(precision, self.precision_used, device, strategy)
        if channels_last is None:  # fp32 unfolded is the exact mode: the teachers run as given (eager NCHW)
            channels_last = not (self.precision_used == "fp32" and not fold_bn)
        self.channels_last = bool(channels_last)
        self.fold_bn = bool(fold_bn)
        self.overlap = bool(overlap)
        self.compile_requested = bool(compile)
        self.compile_error: str | None = None
        self._build_runners(device)
        self._stream = None

    def _build_runners(self, device: torch.device) -> None:
        """(Re)make the modules that run from the caller's teachers: folded / channels_last / compiled copies."""
        compile = self.compile_requested and self.compile_error is None
        self.folded_bn = 0
        runners = []
        for t in self.teachers:
            if self.fold_bn:
                t, n = fold_batchnorm(t)
                self.folded_bn += n
            elif self.channels_last or compile:
                t = copy.deepcopy(t)
            if self.channels_last:
                t = t.to(memory_format=torch.channels_last)
            runners.append(t.requires_grad_(False).eval())
        # the modules that run; kept out of the module tree so state_dict()/parameters() are the caller's teachers
        self._copies = self.fold_bn or self.channels_last or compile
        self._runners: list[nn.Module] = runners if self._copies else list(self.teachers)
        self.compile = False
        if compile:
            why = _compile_unavailable(device)
            if why:
                self._compile_fallback(why)
            else:
                # teachers of one family share a forward code object, and dynamo's recompile limit (8) is per
                # code object: M teachers x batch sizes x precisions would silently fall back to eager
                import torch._dynamo as dynamo

                cfg = dynamo.config
                name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
                setattr(cfg, name, max(getattr(cfg, name), 16 * len(self._runners)))
                self._compiled = [_compile(t, device) for t in self._runners]
                self.compile = True
        self._tracked = [x for t in self.teachers for x in (*t.parameters(), *t.buffers()) if _has_version(x)]
        self._versions = self._tensor_versions()
        self._weights_key = self.weights_key()

    def _tensor_versions(self) -> list:
        """The in-place version counters of the caller's parameters and buffers (``load_state_dict`` and any
        in-place edit bump them): the per-run check, one attribute read per tensor (0.4 ms for the 1445 tensors
        of four CIFAR teachers on a loaded 2-core machine; the full :meth:`weights_key` walk took 10.8 ms)."""
        return [x._version for x in self._tracked]

    def weights_key(self) -> tuple:
        """What identifies the caller's teachers' current weights: each parameter's and buffer's identity,
        storage and version counter. Checked by :meth:`refresh` (and so by ``build_cache``), which also sees a
        replaced parameter object; each run checks the version counters only."""
        return tuple((id(x), x.data_ptr(), x._version if _has_version(x) else -1)
                     for t in self.teachers for x in (*t.parameters(), *t.buffers()))

    def refresh(self, force: bool = False) -> bool:
        """Rebuild the running copies (folded, channels_last, compiled) when the caller's teachers changed since
        they were made (``live.teachers[0].load_state_dict(new)``, an in-place edit, a replaced parameter), so
        the engine never runs stale weights. Each run checks the version counters (load_state_dict, in-place
        edits); ``build_cache`` calls this, which also sees a replaced parameter object: call it yourself after
        replacing one. An edit through ``param.data`` bypasses the version counter: call ``refresh(force=True)``
        after one. Returns True when it rebuilt."""
        if not force and self._tensor_versions() == self._versions and self.weights_key() == self._weights_key:
            return False
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        self._build_runners(self.device_of_teachers())
        return True

    def device_of_teachers(self) -> torch.device:
        p = next((p for t in self.teachers for p in t.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    @property
    def device(self) -> torch.device:
        """Where the teachers (their running copies) are."""
        p = next((p for t in self._runners for p in t.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype the teachers run under (None: float32)."""
        return _DTYPES[self.precision_used]

    def describe(self) -> str:
        """One line for logs: what the engine does."""
        return (f"teachers: {self.num_teachers} live on {self.device}, precision {self.precision_used} "
                f"({self.precision_reason}), "
                f"BatchNorm {'folded (' + str(self.folded_bn) + ' layers)' if self.fold_bn else 'unfolded'}, "
                f"channels_last {'on' if self.channels_last else 'off'}, compile "
                f"{'on' if self.compile else 'off' if self.compile_error is None else 'failed: ' + self.compile_error}"
                f"{', side CUDA stream' if self.overlap and self.device.type == 'cuda' else ''}")

    def info(self) -> dict:
        return {"precision": self.precision, "precision_used": self.precision_used, "fold_bn": self.fold_bn,
                "folded_bn": self.folded_bn, "channels_last": self.channels_last, "compile": self.compile,
                "device": str(self.device)}

    def train(self, mode: bool = True):  # teachers stay frozen in eval mode whatever the trainer does
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() move the running copies too
        stale = hasattr(self, "_weights_key") and (  # edited before the move
            self._tensor_versions() != self._versions or self.weights_key() != self._weights_key)
        out = super()._apply(fn, *args, **kwargs)
        for t in getattr(self, "_runners", ()):
            if not any(t is s for s in self.teachers):
                t._apply(fn, *args, **kwargs)
        if stale:
            self.refresh(force=True)
        elif hasattr(self, "_weights_key"):  # moved, not edited: the copies moved with them
            self._tracked = [x for t in self.teachers for x in (*t.parameters(), *t.buffers()) if _has_version(x)]
            self._versions = self._tensor_versions()
            self._weights_key = self.weights_key()
        return out

    def _compile_fallback(self, why: str) -> None:
        self.compile = False
        self.compile_error = why
        warnings.warn(f"teacher_compile: {why}; the teachers run eagerly", RuntimeWarning, stacklevel=3)

    def _run(self, x: Tensor, which: Sequence[int] | None = None):
        dtype = self.autocast_dtype
        runners = self._compiled if self.compile else self._runners
        if which is not None:
            runners = [runners[i] for i in which]
        out = []
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            for t in runners:
                try:
                    feats, z = t(x, is_feat=True)
                except Exception as exc:  # noqa: BLE001 - a compile failure shows at the first call
                    if not self.compile:
                        raise
                    self._compile_fallback("torch.compile failed "
                                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                    return self._run(x, which)
                out.append((z, feats[-1], feats[-2]))
        return out

    def _forward(self, images: Tensor, which: Sequence[int] | None = None) -> TeacherOutputs:
        if self._copies and self._tensor_versions() != self._versions:  # never run copies of edited weights
            self.refresh(force=True)
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images
        with torch.inference_mode():
            out = self._run(x, which)
            logits = torch.stack([z.float() for z, _, _ in out])
            embeddings = [e.float() for _, e, _ in out]
            maps = [f.float() for _, _, f in out]
        # clone out of inference mode so the outputs can be used in autograd graphs (as constants); contiguous,
        # so a channels_last run hands back the usual layout
        with torch.inference_mode(False):
            return TeacherOutputs(logits.clone(), [e.clone() for e in embeddings],
                                  [f.clone(memory_format=torch.contiguous_format) for f in maps])

    def forward(self, images: Tensor, indices: Tensor | None = None, view: int = 0) -> TeacherOutputs:
        if not (self.overlap and images.is_cuda):
            return self._forward(images)
        main = torch.cuda.current_stream(images.device)
        if self._stream is None or self._stream.device != images.device:
            self._stream = torch.cuda.Stream(images.device)
        side = self._stream
        side.wait_stream(main)  # the images (and anything before) are ready
        with torch.cuda.stream(side):
            out = self._forward(images)
            done = torch.cuda.Event()
            done.record(side)
        images.record_stream(side)  # the images' memory is not reused while the teachers still read it
        return _PendingOutputs(out.logits, out.embeddings, out.feature_maps, done)

    def run_subset(self, images: Tensor, which: Sequence[int]) -> TeacherOutputs:
        """The outputs of teachers ``which`` only (synchronously): a cache computes the fields it left out."""
        return self._forward(images, list(which))

    @staticmethod
    def wait(outputs: TeacherOutputs) -> TeacherOutputs:
        """``outputs`` safe to use on the current stream (see :func:`ready`)."""
        return ready(outputs)
