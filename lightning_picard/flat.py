"""The Picard parameters as views of one flat buffer, and the layout of a gradient row.

Loading a guess, measuring an error and recording a replayed state are then single kernels on one tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_picard.resize import unproject

Layout = tuple[torch.Size, ...]
"""The shapes of the Picard parameters, in order."""

"""The shapes of the Picard parameters, in order."""


class FlatParameters:
    """Parameters re-seated as views of one contiguous buffer, plus the flat layout of their gradients.

    A gradient row holds one flag per parameter tensor (1 if the parameter received a gradient, 0 if its
    ``.grad`` was ``None``), so that replay skips exactly the parameters the sequential optimizer would skip,
    followed by the ``numel`` gradient values.

    The layout (the parameters' shapes) may change: :meth:`set_layout` re-seats the parameters in a buffer of
    other shapes (to evaluate a guess of another size), :meth:`absorb` adopts shapes a module gave its
    parameters (``param.data = new_rows``) in a resize.

    Args:
        params: the parameters, in a fixed order.
        names: their names (as in ``named_parameters``), used to match a module's resize reports.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("Picard needs at least one trainable parameter; the module has none.")
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.params))]
        if len(self.names) != len(self.params):
            raise ValueError(f"got {len(self.names)} names for {len(self.params)} parameters")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"All trainable parameters must share one dtype and device for Picard, got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}. Cast the module to one "
                "dtype (e.g. precision='bf16-true' or '32-true') before fitting."
            )
        self._install(
            torch.cat([p.detach().reshape(-1) for p in self.params]), tuple(p.shape for p in self.params)
        )

    def _install(self, flat: torch.Tensor, layout: Layout) -> None:
        self.flat = flat
        self.layout: Layout = layout
        self.numels = [s.numel() for s in layout]
        self.numel = sum(self.numels)
        self._slices = []
        offset = 0
        for p, shape, n in zip(self.params, layout, self.numels):
            p.data = flat[offset : offset + n].view(shape)
            self._slices.append(slice(offset, offset + n))
            offset += n
        self._grad_flat = torch.zeros_like(flat)
        self._grad_views = [self._grad_flat[s].view(shape) for s, shape in zip(self._slices, layout)]

    @property
    def header(self) -> int:
        """Length of a gradient row's header: one presence flag per parameter tensor."""
        return len(self.params)

    @property
    def row_length(self) -> int:
        """Length of one gradient row in the current layout: the presence flags and the gradients."""
        return self.header + self.numel

    def new_rows(self, n: int) -> torch.Tensor:
        """A zeroed ``[n, row_length]`` buffer on the parameters' device and dtype."""
        return self.flat.new_zeros((n, self.row_length))

    def set_layout(self, layout: Layout) -> None:
        """Re-seat the parameters in a new buffer of shapes ``layout`` (values undefined); no-op if unchanged."""
        if layout != self.layout:
            self._install(self.flat.new_empty(sum(s.numel() for s in layout)), layout)

    def absorb(self) -> bool:
        """Adopt parameters whose storage the module replaced (``param.data = …``); returns whether any was."""
        size = self.flat.element_size()
        base = self.flat.data_ptr()
        if all(
            p.shape == shape and p.data_ptr() == base + s.start * size and p.is_contiguous()
            for p, shape, s in zip(self.params, self.layout, self._slices)
        ):
            return False
        bad = [
            n
            for n, p in zip(self.names, self.params)
            if p.dtype != self.flat.dtype or p.device != self.flat.device
        ]
        if bad:
            raise ValueError(
                f"Parameters {bad} changed dtype or device during fit; Picard keeps one dtype and device."
            )
        self._install(
            torch.cat([p.detach().reshape(-1) for p in self.params]), tuple(p.shape for p in self.params)
        )
        return True

    def write_gradients(self, row: torch.Tensor) -> None:
        """Copy the current ``.grad`` of every parameter into ``row`` (zeros and flag 0 where ``None``).

        One ``cat`` into the row when every parameter has a gradient (the usual case), not a copy per tensor.
        """
        flags, values = row[: self.header], row[self.header : self.row_length]
        grads = [p.grad for p in self.params]
        if all(g is not None and g.dtype == values.dtype for g in grads):
            torch.cat([g.reshape(-1) for g in grads], out=values)  # type: ignore[union-attr]
            flags.fill_(1)
            return
        for i, (g, s) in enumerate(zip(grads, self._slices)):
            if g is None:
                values[s].zero_()
                flags[i] = 0
            else:
                values[s].copy_(g.reshape(-1))
                flags[i] = 1

    def load_gradients(
        self,
        row: torch.Tensor,
        present: Sequence[bool],
        layout: Layout | None = None,
        maps: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Set ``.grad`` of every parameter from ``row``; ``None`` where ``present`` is False.

        The gradients are copied into storage owned here, so in-place changes (gradient clipping) by the
        optimizer step never alter ``row``. A row written in another ``layout`` is mapped onto the current one
        through ``maps`` (tensor name → source row of each current row, see :func:`~lightning_picard.resize.row_maps`):
        children take their parent's gradient, rows without a source get zero.
        """
        values = row[self.header :]
        if (layout is None or layout == self.layout) and not maps:
            self._grad_flat.copy_(values[: self.numel])
        else:
            offset = 0
            for name, view, shape in zip(self.names, self._grad_views, layout or self.layout):
                source = values[offset : offset + shape.numel()].view(shape)
                offset += shape.numel()
                if maps and name in maps:
                    source = unproject(source, maps[name])
                if source.shape != view.shape:
                    raise RuntimeError(
                        f"The gradient of {name!r} has shape {tuple(source.shape)} but the parameter has "
                        f"{tuple(view.shape)} and no resize event relates them: report every change of a "
                        "parameter's rows from picard_after_optimizer_step."
                    )
                view.copy_(source)
        for p, view, has_grad in zip(self.params, self._grad_views, present):
            if not has_grad:
                p.grad = None
            elif p.grad is not view:
                p.grad = view

    def presence(self, row: torch.Tensor) -> list[bool]:
        """Which parameters have a gradient in ``row`` (one host read of the flags)."""
        return [bool(v) for v in row[: self.header].tolist()]
