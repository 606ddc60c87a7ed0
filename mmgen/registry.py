"""The component registry: every swappable piece of a model registers itself where it is defined.

A *kind* is an interface (LLM backbone, visual encoder, output head, ...). Declaring a kind base::

    class VisualEncoder(Component, kind="visual_encoder"): ...

and every concrete subclass of it, in mmgen or in research code, is registered under its class name
the moment its module is imported. Configs name a component by that short name or by its full
``class_path`` (LightningCLI/jsonargparse resolve both among the imported subclasses of the type an
argument declares). ``mmgen components`` lists what is registered.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

from torch import nn

#: kind -> {class name -> class}, filled by Component.__init_subclass__.
REGISTRY: dict[str, dict[str, type]] = defaultdict(dict)


class Registered:
    """Mixin that registers concrete subclasses of a kind base under their class name."""

    kind: str = ""

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:  # a kind base: it defines the interface, it is not a component itself
            cls.kind = kind
            REGISTRY.setdefault(kind, {})
            return
        if cls.kind and not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            REGISTRY[cls.kind][cls.__name__] = cls


class Component(Registered, nn.Module):
    """A swappable model part that builds its weights in :meth:`configure`, not in ``__init__``.

    ``__init__`` only records arguments, so parsing a config (``--help``, ``--print_config``) is
    instant and offline. :meth:`configure` loads or builds the weights and declares what trains; the
    LightningModule calls it from ``configure_model`` (which Lightning runs inside the strategy's
    device/sharding context) with whatever dimensions the component needs from its neighbours.
    """

    def configure(self, **dims) -> None:
        raise NotImplementedError

    def own_dtype(self, *tensors: "torch.Tensor"):
        """``tensors`` in this component's parameter dtype: each component casts its own inputs,
        so it works whatever precision its neighbours run in (fp32, bf16-mixed, bf16-true)."""
        param = next(self.parameters(), None)
        cast = tuple(t if t is None or param is None else t.to(param.dtype) for t in tensors)
        return cast[0] if len(cast) == 1 else cast

    def follow_run_precision(self, dtype: "torch.dtype") -> None:
        """Store the frozen weights in ``dtype``, the run's precision (mmgen.precision), when this
        component's ``dtype`` argument is "auto". The method calls it before ``configure``; a
        component already built keeps the dtype it was built in."""
        if getattr(self, "dtype_name", None) == "auto" and not self.is_configured:
            self.dtype = dtype

    @property
    def is_configured(self) -> bool:
        return any(True for _ in self.parameters(recurse=True))


def registered(kind: str | None = None) -> dict[str, dict[str, type]]:
    """The registry (importing mmgen's own components first), optionally one kind only."""
    import mmgen.components  # noqa: F401  (registers mmgen's components)
    import mmgen.methods  # noqa: F401
    import mmgen.evaluation  # noqa: F401  (the measuring networks of mmgen eval)

    if kind is None:
        return {k: dict(v) for k, v in sorted(REGISTRY.items())}
    if kind not in REGISTRY:
        raise KeyError(f"no component kind {kind!r}; kinds are {sorted(REGISTRY)}")
    return {kind: dict(REGISTRY[kind])}
