"""The contract every velocity model keeps: ``u = model(z, y=None, aug=None, cond=None, head="u")``.

``z`` is the unified input (``models/unified_input.py``): the state and both times of
``u(x_s, s, t)`` in one tensor,

- dense data: ``(B, D + 2)`` laid out ``[x, s, t]``;
- images: ``(B, C + 2, H, W)``, the last two channels constant planes ``s`` and ``t``.

``u`` has the state's shape, ``(B, D)`` or ``(B, C, H, W)``. ``y`` holds class ids
``(B,)`` (int64) for a class-conditional model (``num_classes > 0``), which also has a
learned null class at index ``num_classes`` (classifier-free guidance): ``y=None``
means "no label", every sample the null class. An unconditional model
(``num_classes = 0``) takes no labels.

Beyond the label, a model may take ``num_conds`` extra scalar conditions ``cond``
(B, num_conds) (a guidance scale and its interval, as iMF does), embedded like a
time. ``time_cond`` says which functions of ``(s, t)`` it embeds
(``models/embeddings.py``). With ``aux_head`` it has a second output, an auxiliary
velocity ``v`` beside ``u`` on a shared body (iMF's v-head): ``head`` picks ``"u"``,
``"v"`` or ``"both"`` (the pair from one pass of the body). The auxiliary head's
modules are named ``aux_*``: ``inference_state_dict`` and ``inference_config`` drop
it for export and sampling.

The base class owns these rules, so that a model's ``forward`` starts with

    x, s, t, y, aug, cond = self.inputs(z, y, aug, cond, head)
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.unified_input import split_unified_input

from models.embeddings import check_time_cond

HEADS = ("u", "v", "both")
AUX_PREFIX = "aux_"  # the auxiliary head's modules, dropped for inference


class BaseModel(nn.Module, ABC):
    """A mean-velocity field ``u(x_s, s, t | y)`` on the unified input (module docstring).

    Args:
        num_classes: 0 for an unconditional model; otherwise the real classes are
            ``0 .. num_classes - 1`` and index ``num_classes`` is the null class.
        augment_dim: size of the EDM augment label the model is conditioned on (6 for
            the CIFAR-10 recipe's pipe; 0: none). Sampling passes no label: all zeros,
            i.e. "not augmented" (Karras et al. 2022, Appendix C.4).
        num_conds: number of extra scalar conditions ``cond`` (0: none).
        aux_head: a second output, the auxiliary velocity (``head="v"``).
        time_cond: which times the network embeds: ``s_h`` (default), ``s_t``,
            ``t_h``, ``s_t_h`` or ``h`` (``models/embeddings.py``, with the MeanFlow
            paper's names).
    """

    # the constructor arguments of a model without its auxiliary head (``inference_config``)
    INFERENCE_CONFIG: dict[str, object] = {"aux_head": False}

    def __init__(self, num_classes: int = 0, augment_dim: int = 0, num_conds: int = 0, aux_head: bool = False,
                 time_cond: str = "s_h") -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}: expected 0 (unconditional) or the number of classes")
        if augment_dim < 0:
            raise ValueError(f"augment_dim={augment_dim}: expected 0 (no augment label) or its size (6 for dataloaders/augment.py)")
        if num_conds < 0:
            raise ValueError(f"num_conds={num_conds}: expected 0 (no extra conditions) or their number (3 for iMF's ω, t_min, t_max)")
        check_time_cond(time_cond)
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        self.num_conds = num_conds
        self.aux_head = aux_head
        self.time_cond = time_cond

    @abstractmethod
    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        """``u(x_s, s, t | y, cond)``, or the auxiliary ``v``, or both.

        Args:
            z: unified input, (B, D + 2) or (B, C + 2, H, W).
            y: class ids (B,) int64, or None (the null class; required for an
                unconditional model).
            aug: augment labels (B, augment_dim) of augmented training data, or None
                (not augmented; required for a model with ``augment_dim = 0``).
            cond: extra conditions (B, num_conds); None for a model with ``num_conds = 0``,
                required otherwise.
            head: ``"u"``, ``"v"`` (needs ``aux_head``) or ``"both"``: ``(u, v)`` from one
                pass of the shared body.

        Returns:
            (B, D) or (B, C, H, W): the state's shape; a pair of them for ``"both"``.
        """

    def null_labels(self, n: int, device: torch.device | str) -> Tensor:
        """``n`` null-class labels (index ``num_classes``), (n,) int64."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def labels(self, y: Tensor | None, z: Tensor) -> Tensor | None:
        """The labels the model embeds for the batch ``z``: None for an unconditional
        model, the null class where ``y`` is None. Checks shapes only (no value check:
        it would synchronise the device on every forward)."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0) but got class labels; pass y=None")
            return None
        if y is None:
            return self.null_labels(z.shape[0], z.device)
        if y.shape != (z.shape[0],):
            raise ValueError(f"labels of shape {tuple(y.shape)} for a batch of {z.shape[0]}: expected ({z.shape[0]},)")
        return y

    def augment_labels(self, aug: Tensor | None, z: Tensor) -> Tensor | None:
        """The augment labels the model embeds: None without an augment input, zeros
        (no augmentation) where ``aug`` is None."""
        if self.augment_dim == 0:
            if aug is not None:
                raise ValueError(f"this model has no augment input (augment_dim=0) but got augment labels of width "
                                 f"{aug.shape[-1]}: set model.augment_dim={aug.shape[-1]} to train on dataloaders.augment")
            return None
        if aug is None:
            return z.new_zeros(z.shape[0], self.augment_dim)
        if aug.shape != (z.shape[0], self.augment_dim):
            raise ValueError(f"augment labels of shape {tuple(aug.shape)}: expected ({z.shape[0]}, {self.augment_dim}) (model.augment_dim)")
        return aug.to(z.dtype)

    def conditions(self, cond: Tensor | None, z: Tensor) -> Tensor | None:
        """The extra conditions the model embeds: None without any, else ``cond`` in the
        input's dtype. Checks shapes only (a value check would synchronise the device)."""
        if self.num_conds == 0:
            if cond is not None:
                raise ValueError(f"this model takes no extra conditions (num_conds=0) but got {cond.shape[-1]}: "
                                 f"set model.num_conds={cond.shape[-1]} or pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"this model takes {self.num_conds} extra conditions (num_conds={self.num_conds}) "
                             f"but got cond=None: pass a ({z.shape[0]}, {self.num_conds}) tensor")
        if cond.shape != (z.shape[0], self.num_conds):
            raise ValueError(f"conditions of shape {tuple(cond.shape)}: expected ({z.shape[0]}, {self.num_conds}) (model.num_conds)")
        return cond.to(z.dtype)

    def inputs(self, z: Tensor, y: Tensor | None, aug: Tensor | None, cond: Tensor | None, head: str):
        """``(x, s, t, y, aug, cond)``: the state and both times of ``z``, the labels with the
        null class where none is given (None for an unconditional model), the augment labels
        (zeros where not augmented; None without an augment input), the extra conditions
        (None without any), after checking ``head``."""
        self.check_head(head)
        x, s, t = split_unified_input(z)
        return x, s, t, self.labels(y, z), self.augment_labels(aug, z), self.conditions(cond, z)

    def check_head(self, head: str) -> None:
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {list(HEADS)}")
        if head != "u" and not self.aux_head:
            raise ValueError(f"head={head!r} needs the auxiliary head: build the model with aux_head=True (model.aux_head=true)")

    @staticmethod
    def outputs(head: str, h: Tensor, u_out: Callable[[Tensor], Tensor],
                v_out: Callable[[Tensor], Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        """The heads ``head`` asks for, each applied to the shared body's output ``h``."""
        if head == "u":
            return u_out(h)
        if head == "v":
            return v_out(h)
        return u_out(h), v_out(h)

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The weights without the auxiliary head: a model built with
        ``inference_config`` loads them strictly and gives the same ``u``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(AUX_PREFIX)}

    def inference_config(self, model_cfg: dict) -> dict:
        """The model's config node (a plain dict) for the weights of
        ``inference_state_dict``: the same model without its auxiliary head."""
        return {**model_cfg, **self.INFERENCE_CONFIG}
