"""Teacher weighting strategies behind one interface, so the baselines share everything else (docs/method.md section 9).

Each strategy turns one batch's teacher information into per-sample weights ``(logit_weights, feature_weights)``
[B, M] that enter the one student loss of docs/method.md section 3 (``alpha``, ``beta`` and everything else are the same
for every strategy; only the weighting follows each method's source); ``"none"`` trains with cross-entropy only.

The strategies are a registry (torchdistill's ``register_*`` / ``get_*`` pattern): one module per strategy in this
package, each a :class:`WeightStrategy` subclass registered by name with :func:`register_strategy`, which declares
what the step must give it (``requires``, from :data:`NEEDS`) and which method options it reads (``options``, with
:meth:`WeightStrategy.check_options` validating them). :func:`get_strategy` returns the class by name and
:func:`list_strategies` the names; ``TrainConfig.strategy``'s and the Distiller's choices, ``train``, the Trainer
and the Distiller ask the registry instead of naming strategies (docs/training.md, "Adding a strategy").

The baselines follow the code the MTKD-RL authors' comparisons ran, the CA-MKD repository (Rorozhl/CA-MKD,
``helper/loops.py`` and ``distiller_zoo/CAMKD.py``); where this differs from that code, the docstring says so.
That code divides the EB-KD and CA-MKD weighted sums over teachers by B*M, so those weights carry a factor 1/M:
- ``aver``: 1/M per teacher for logits and features.
- ``ebkd`` (Kwon et al., ICASSP 2020; the code's ``EBKD`` branch): logits only, w_m = (1 - H_m / sum_j H_j) / M.
- ``camkd`` (Zhang et al., ICASSP 2022; the ``CAMKD`` branch and ``CAMKD.py``): logit weights (1 - softmax_m(CE of
  teacher m's logits)) / ((M - 1) M); feature weights the same form on the CE of teacher m's CLASSIFIER applied
  to the pooled transformed student map G_m; no feature distillation in epoch 0.
- ``aekd`` (Du et al., NeurIPS 2020; the ``AEKD`` branch and ``helper/optimization.py``): one weight per teacher
  per batch, the min-norm point of the teachers' KD gradients w.r.t. the student logits (a nu-SVM dual), summing
  to 1; logits only.
- ``mtkd_rl``: the agent's weights (docs/method.md sections 4-7).

Two options reproduce the CA-MKD code's step exactly where the default departs from it (docs/training.md, "The
baselines as published"): ``camkd_weight_grad`` lets the gradient flow through CA-MKD's feature weights (the code
does not detach them), and ``aekd_solver="libsvm"`` solves AEKD's dual with scikit-learn's ``OneClassSVM`` as the
code does (which stops early when the Gram matrix is tiny) instead of exactly.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Sequence as _SequenceABC
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from ...agent import AgentState, MTKDAgent
from ...distiller import _config_options

__all__ = ["WeightStrategy", "NEEDS", "register_strategy", "get_strategy", "list_strategies", "StrategyNames",
           "STRATEGY_NAMES", "DISTILLING_STRATEGIES", "check_strategy_options", "make_strategy",
           # the strategies and their weight functions, from their modules
           "NoDistillation", "Average", "EntropyBased", "ConfidenceAware", "AdaptiveEnsemble", "MTKDRL",
           "aver_weights", "ebkd_weights", "camkd_weights", "camkd_feature_weights", "aekd_weights",
           "min_norm_simplex", "libsvm_simplex", "AEKD_C", "AEKD_SOLVERS"]

# What a strategy can declare in ``requires``: what the step (Distiller, Trainer, ``train``) must give it.
NEEDS = {
    "teachers": "the teachers' outputs, live or from a cache (without it the step is plain cross-entropy)",
    "teacher_ce": "each teacher's cross-entropy against the label, [B, M]",
    "agent_state": "the agent state (KL and the cosine of each teacher's embedding to the transformed student map; "
                   "the embeddings must be the pooled teacher maps)",
    "agent": "an MTKDAgent built from the agent options (dynamic, agent_update; agent_lr, agent_step and "
             "agent_buffer_dtype for its training), trained by the Distiller on the stored states and rewards",
    "teacher_heads": "each teacher's classifier head (the teacher models, also when the outputs come from a cache)",
}
# what each need implies besides itself (a declaration breaking this is refused at registration)
_IMPLIES = {"teacher_ce": ("teachers",), "agent_state": ("teachers",), "agent": ("teachers", "agent_state"),
            "teacher_heads": ("teachers",)}


class _Needs:
    """``needs_X``: whether the class's ``requires`` names X (read from the declaration, on the class too)."""

    def __init__(self, need: str):
        self.need = need

    def __get__(self, obj, cls=None) -> bool:
        return self.need in (cls if cls is not None else type(obj)).requires


class WeightStrategy:
    """Per-sample teacher weights for one batch; subclass it in one module and register it with
    :func:`register_strategy`.

    A strategy declares (registration refuses a class without them):

    - ``requires``: a frozenset of :data:`NEEDS` keys, what the step must give it; read as ``needs_teachers``
      (the step runs distillation at all), ``needs_teacher_ce``, ``needs_state`` (the agent state is built before
      the weights), ``needs_agent`` (``build`` passes ``agent=``) and ``needs_teacher_heads`` (``build`` passes
      ``teacher_heads=``).
    - ``options``: the method options (``TrainConfig`` fields of the Distiller) it reads; :meth:`build` passes
      each as a keyword argument of the same name to ``__init__`` after :meth:`check_options`.
    """

    name = "base"  # set by register_strategy
    agent: Optional[MTKDAgent] = None
    needs_teachers = _Needs("teachers")
    needs_teacher_ce = _Needs("teacher_ce")
    needs_state = _Needs("agent_state")
    needs_agent = _Needs("agent")
    needs_teacher_heads = _Needs("teacher_heads")

    @classmethod
    def check_options(cls, values: Mapping[str, Any]) -> None:
        """Raise ValueError, naming the option, for a value of ``values`` (one per name in ``options``) outside
        the option's range (``aekd_nu`` in (0, 1]). TrainConfig.validate runs every registered strategy's check,
        whichever strategy the config names, so a shared option's limits for this strategy alone (a temperature it
        cannot use) belong in ``__init__``."""

    @classmethod
    def build(cls, options: Mapping[str, Any], agent: Optional[MTKDAgent] = None,
              teacher_heads: Optional[Sequence[nn.Module]] = None) -> "WeightStrategy":
        """The strategy for method options ``options`` (a mapping with any of the Distiller's options; those it
        reads and ``options`` lacks take the Distiller's defaults) and the resources its ``requires`` names."""
        defaults = _method_defaults()  # shared: not modified
        values = {name: options[name] if name in options else defaults[name] for name in cls.options}
        cls.check_options(values)
        if cls.needs_agent:
            if agent is None:
                raise ValueError(f"agent: the {cls.name} strategy needs an MTKDAgent")
            values["agent"] = agent
        if cls.needs_teacher_heads:
            values["teacher_heads"] = teacher_heads
        return cls(**values)

    def weights(self, epoch: int, teacher_logits: Tensor, teacher_ce: Optional[Tensor], state: Optional[AgentState],
                student_logits: Optional[Tensor] = None, student_maps: Optional[Sequence[Tensor]] = None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Return (logit_weights, feature_weights, sampled_actions_or_None), weights [B, M] without gradient
        (but camkd's feature weights with ``weight_grad``). ``teacher_logits`` [M, B, K]; ``teacher_ce`` [B, M]
        (with ``needs_teacher_ce``, else None); ``state`` (with ``needs_state``, else None); ``student_logits``
        [B, K] (detached), ``student_maps`` (the transformed maps G_m, or None) and ``labels`` [B]."""
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}


def register_strategy(name: str):
    """Class decorator: register a :class:`WeightStrategy` subclass as strategy ``name`` (``--strategy name``),
    after checking its declaration (``requires``, ``options``, ``weights``, an ``__init__`` taking them); a
    malformed declaration or a name taken by another class is a TypeError / ValueError here, at import."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected a strategy name made of letters, digits and _, got {name!r}")

    def register(cls):
        _check_declaration(name, cls)
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"name: strategy {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"strategy: expected one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def list_strategies(distils: Optional[bool] = None) -> tuple[str, ...]:
    """The registered names in registration order; ``distils`` True: those that use teachers, False: the
    others (``none``)."""
    return tuple(n for n, cls in _REGISTRY.items() if distils is None or cls.needs_teachers == distils)


class StrategyNames(_SequenceABC):
    """A live, read-only view of :func:`list_strategies` (what ``TrainConfig.strategy`` and the Distiller accept):
    a strategy registered after import, by a module of the user's, is a valid choice at once."""

    def __init__(self, distils: Optional[bool] = None):
        self._distils = distils

    def __getitem__(self, index):
        return list_strategies(self._distils)[index]

    def __len__(self) -> int:
        return len(list_strategies(self._distils))

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (StrategyNames, tuple, list)) else other)

    def __repr__(self) -> str:
        return repr(tuple(self))


STRATEGY_NAMES = StrategyNames()  # every strategy, "none" included (TrainConfig.strategy)
DISTILLING_STRATEGIES = StrategyNames(distils=True)  # those with teachers (the Distiller's strategy)


def check_strategy_options(config) -> None:
    """Every registered strategy's :meth:`WeightStrategy.check_options` on ``config``'s values (a TrainConfig or
    anything with the option attributes). An option's range is checked whatever strategy the config names, as
    TrainConfig has always checked ``aekd_nu``."""
    for cls in _REGISTRY.values():
        cls.check_options({name: getattr(config, name) for name in cls.options})


@functools.lru_cache(maxsize=None)
def _method_defaults() -> dict:  # the Distiller's signature, read once
    from ...distiller import Distiller

    params = inspect.signature(Distiller.__init__).parameters
    return {name: params[name].default for name in _config_options() if name != "strategy"}


def _check_declaration(name: str, cls) -> None:
    where = f"strategy {name!r} ({getattr(cls, '__qualname__', cls)!r})"
    if not (isinstance(cls, type) and issubclass(cls, WeightStrategy)):
        raise TypeError(f"{where}: expected a WeightStrategy subclass")
    for attr in ("requires", "options"):
        if not hasattr(cls, attr):
            raise TypeError(f"{where}: declares no {attr!r} (what it needs: a frozenset of {sorted(NEEDS)}; "
                            "options: the method options it reads)")
    requires, options = cls.requires, cls.options
    if not isinstance(requires, frozenset) or not requires <= set(NEEDS):
        raise TypeError(f"{where}: requires: expected a frozenset of {sorted(NEEDS)}, got {requires!r}")
    for need in sorted(requires):
        missing = [m for m in _IMPLIES.get(need, ()) if m not in requires]
        if missing:
            raise TypeError(f"{where}: requires {need!r}, which needs {missing} too")
    method_options = [n for n in _config_options() if n != "strategy"]
    if not isinstance(options, tuple) or not all(isinstance(o, str) and o in method_options for o in options):
        raise TypeError(f"{where}: options: expected a tuple of method option names {method_options}, "
                        f"got {options!r}")
    if "teachers" in requires and cls.weights is WeightStrategy.weights:
        raise TypeError(f"{where}: requires teachers but defines no weights()")
    keywords = list(options) + ["agent"] * ("agent" in requires) + ["teacher_heads"] * ("teacher_heads" in requires)
    try:
        inspect.signature(cls).bind(**dict.fromkeys(keywords))
    except TypeError as exc:
        raise TypeError(f"{where}: __init__ must take the keyword arguments {keywords} that build() passes "
                        f"({exc})") from None


def make_strategy(name: str, agent: Optional[MTKDAgent] = None, warmup_weights: str = "ones",
                  teacher_heads: Optional[Sequence[nn.Module]] = None, temperature: float = 4.0,
                  aekd_nu: Optional[float] = None, camkd_weight_grad: bool = False,
                  aekd_solver: str = "exact", **options) -> WeightStrategy:
    """The strategy called ``name`` (any of :func:`list_strategies`), built by its class's
    :meth:`WeightStrategy.build`: mtkd_rl needs ``agent``; camkd needs ``teacher_heads`` (each teacher's final
    linear layer) and uses ``camkd_weight_grad``; aekd uses ``temperature``, ``aekd_nu`` and ``aekd_solver``;
    ``options``: any other method option a registered strategy reads."""
    options.update(warmup_weights=warmup_weights, temperature=temperature, aekd_nu=aekd_nu,
                   camkd_weight_grad=camkd_weight_grad, aekd_solver=aekd_solver)
    return get_strategy(name).build(options, agent=agent, teacher_heads=teacher_heads)


# the built-in strategies' modules, in the order of TrainConfig.strategy's choices
_BUILTIN = ("none", "mtkd_rl", "aver", "ebkd", "camkd", "aekd")


def _import_strategy_modules() -> None:
    """Import (so register) the built-in strategies in their order, then every other module of this package: a
    new strategy is one file in this folder, with no list to add it to."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _BUILTIN and m.name[0] != "_")
    for module in _BUILTIN + tuple(found):
        importlib.import_module(f"{__name__}.{module}")


_import_strategy_modules()
from .aekd import AEKD_C, AEKD_SOLVERS, AdaptiveEnsemble, aekd_weights, libsvm_simplex, min_norm_simplex  # noqa: E402
from .aver import Average, aver_weights  # noqa: E402
from .camkd import ConfidenceAware, camkd_feature_weights, camkd_weights  # noqa: E402
from .ebkd import EntropyBased, ebkd_weights  # noqa: E402
from .mtkd_rl import MTKDRL  # noqa: E402
from .none import NoDistillation  # noqa: E402
