"""Named convolution shape sets (the conv layers of real networks) and the ``--shape`` parser.

A :class:`ConvShape` is one convolution layer's geometry, without batch size, dtype or K. The
named sets list the *distinct* conv layers of torchvision's ResNet-18, ResNet-50 (v1.5: stride
on the 3x3) and MobileNetV2 at a 224x224 input, each with how many times it occurs in the
network (``count``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ConvShape:
    """Geometry of one convolution layer: (cin, h, w) -> (cout, ho, wo), square stride etc.

    ``spatial_dims`` 2 by default. 1: a 1-D convolution along W (length ``w``, kernel ``kw``;
    ``h`` = ``kh`` = 1, and stride, padding and dilation act on W alone). 3: a 3-D one with a
    depth ``d`` and kernel depth ``kd`` too (stride, padding and dilation on all three axes).
    """

    name: str
    cin: int
    cout: int
    h: int
    w: int
    kh: int
    kw: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    count: int = 1
    spatial_dims: int = 2
    d: int = 1
    kd: int = 1

    def __post_init__(self):
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"ConvShape {self.name!r}: spatial_dims must be 1, 2 or 3, got "
                             f"{self.spatial_dims!r}")
        if self.spatial_dims == 1 and (self.h, self.kh) != (1, 1):
            raise ValueError(f"ConvShape {self.name!r}: a 1-D shape runs along W: h and kh "
                             f"must be 1, got h={self.h}, kh={self.kh}")
        if self.spatial_dims != 3 and (self.d, self.kd) != (1, 1):
            raise ValueError(f"ConvShape {self.name!r}: d and kd are for 3-D shapes")
        for field in ("cin", "cout", "h", "w", "kh", "kw", "stride", "dilation", "groups",
                      "count", "d", "kd"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvShape {self.name!r}: {field} must be an int >= 1, "
                                 f"got {value!r}")
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"ConvShape {self.name!r}: padding must be an int >= 0, "
                             f"got {self.padding!r}")
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"ConvShape {self.name!r}: groups={self.groups} must divide "
                             f"cin={self.cin} and cout={self.cout}")
        if self.ho < 1 or self.wo < 1:
            raise ValueError(f"ConvShape {self.name!r}: the output would be empty "
                             f"({self.ho}x{self.wo})")

    def _out(self, size: int, kernel: int) -> int:
        return (size + 2 * self.padding - self.dilation * (kernel - 1) - 1) // self.stride + 1

    @property
    def ho(self) -> int:
        return 1 if self.spatial_dims == 1 else self._out(self.h, self.kh)

    @property
    def wo(self) -> int:
        return self._out(self.w, self.kw)

    @property
    def do(self) -> int:
        """Output depth (1 unless 3-D)."""
        return self._out(self.d, self.kd) if self.spatial_dims == 3 else 1

    @property
    def spatial(self) -> tuple[int, ...]:
        """The input's spatial sizes: (L,), (H, W) or (D, H, W)."""
        return {1: (self.w,), 2: (self.h, self.w), 3: (self.d, self.h, self.w)}[
            self.spatial_dims]

    @property
    def kernel(self) -> tuple[int, ...]:
        """The kernel's spatial sizes: (k,), (kh, kw) or (kd, kh, kw)."""
        return {1: (self.kw,), 2: (self.kh, self.kw), 3: (self.kd, self.kh, self.kw)}[
            self.spatial_dims]

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return {1: (self.wo,), 2: (self.ho, self.wo), 3: (self.do, self.ho, self.wo)}[
            self.spatial_dims]

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of one forward pass of a plain (static) conv of this shape."""
        per_output = (self.cin // self.groups) * self.kh * self.kw * self.kd
        return 2 * batch * self.cout * self.ho * self.wo * self.do * per_output

    def label(self) -> str:
        """Short human label, e.g. ``64->128 k3 s2 @56`` (``dw`` for depthwise; ``@L1000`` in
        1-D, ``@8x56x56`` in 3-D)."""
        kind = "dw " if self.groups == self.cin == self.cout and self.groups > 1 else ""
        grp = f" g{self.groups}" if self.groups > 1 and not kind else ""
        if self.spatial_dims == 1:
            size, kernel = f"L{self.w}", f"{self.kw}"
        elif self.spatial_dims == 3:
            size = f"{self.d}x{self.h}x{self.w}"
            kernel = (f"{self.kh}" if self.kd == self.kh == self.kw
                      else f"{self.kd}x{self.kh}x{self.kw}")
        else:
            size = f"{self.h}" if self.h == self.w else f"{self.h}x{self.w}"
            kernel = f"{self.kh}" if self.kh == self.kw else f"{self.kh}x{self.kw}"
        return f"{kind}{self.cin}->{self.cout} k{kernel} s{self.stride}{grp} @{size}"

    def as_dict(self) -> dict:
        return asdict(self)


def _conv(name, cin, cout, size, k, stride=1, groups=1) -> ConvShape:
    """A square conv with 'same'-style padding k // 2, as every layer of these networks has."""
    return ConvShape(name, cin, cout, size, size, k, k, stride, k // 2, 1, groups)


def _dedupe(layers: list[ConvShape]) -> tuple[ConvShape, ...]:
    """Merge layers of identical geometry, keeping the first name and summing counts."""
    merged: dict[tuple, ConvShape] = {}
    for layer in layers:
        key = geometry_key(layer)
        if key in merged:
            merged[key] = replace(merged[key], count=merged[key].count + layer.count)
        else:
            merged[key] = layer
    return tuple(merged.values())


def geometry_key(shape: ConvShape) -> tuple:
    """Everything but the name and count: two shapes with equal keys are the same conv."""
    key = (shape.cin, shape.cout, shape.h, shape.w, shape.kh, shape.kw, shape.stride,
           shape.padding, shape.dilation, shape.groups)
    if shape.spatial_dims != 2:
        key += (shape.spatial_dims, shape.d, shape.kd)
    return key


def planar(shape: ConvShape, batch: int) -> dict:
    """What the 2-D backends run for ``shape`` at ``batch`` (``dynconv.dynamic_conv1d`` /
    ``dynamic_conv3d`` map themselves onto them): the x shape (B, Cin, H, W), the bank's kernel
    (kh, kw), the (h, w) stride, padding and dilation, and how many such calls (3-D: one per
    depth tap, over the folded B x Do planes; the depth padding applied before)."""
    s = shape
    if s.spatial_dims == 1:
        return {"x": (batch, s.cin, 1, s.w), "kernel": (1, s.kw), "stride": (1, s.stride),
                "padding": (0, s.padding), "dilation": (1, s.dilation), "calls": 1}
    if s.spatial_dims == 3:
        return {"x": (batch * s.do, s.cin, s.h, s.w), "kernel": (s.kh, s.kw),
                "stride": (s.stride,) * 2, "padding": (s.padding,) * 2,
                "dilation": (s.dilation,) * 2, "calls": s.kd}
    return {"x": (batch, s.cin, s.h, s.w), "kernel": (s.kh, s.kw), "stride": (s.stride,) * 2,
            "padding": (s.padding,) * 2, "dilation": (s.dilation,) * 2, "calls": 1}


def _resnet18() -> tuple[ConvShape, ...]:
    layers = [_conv("conv1", 3, 64, 224, 7, 2)]
    size, cin = 56, 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"layer{stage}.{block}"
            layers.append(_conv(f"{prefix}.conv1", cin, cout, size, 3, stride))
            if stride == 2:
                layers.append(_conv(f"{prefix}.downsample", cin, cout, size, 1, 2))
                size //= 2
            layers.append(_conv(f"{prefix}.conv2", cout, cout, size, 3))
            cin = cout
    return _dedupe(layers)


def _resnet50() -> tuple[ConvShape, ...]:
    layers = [_conv("conv1", 3, 64, 224, 7, 2)]
    size, cin = 56, 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        cout = 4 * width
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"layer{stage}.{block}"
            layers.append(_conv(f"{prefix}.conv1", cin, width, size, 1))
            layers.append(_conv(f"{prefix}.conv2", width, width, size, 3, stride))
            if block == 0:
                layers.append(_conv(f"{prefix}.downsample", cin, cout, size, 1, stride))
            size //= stride
            layers.append(_conv(f"{prefix}.conv3", width, cout, size, 1))
            cin = cout
    return _dedupe(layers)


def _mobilenetv2() -> tuple[ConvShape, ...]:
    layers = [_conv("features.0", 3, 32, 224, 3, 2)]
    size, cin, index = 112, 32, 1
    # (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for repeat in range(n):
            stride = s if repeat == 0 else 1
            hidden = cin * t
            prefix = f"features.{index}"
            if t != 1:
                layers.append(_conv(f"{prefix}.expand", cin, hidden, size, 1))
            layers.append(_conv(f"{prefix}.depthwise", hidden, hidden, size, 3, stride, hidden))
            size //= stride
            layers.append(_conv(f"{prefix}.project", hidden, c, size, 1))
            cin, index = c, index + 1
    layers.append(_conv("features.18", cin, 1280, size, 1))
    return _dedupe(layers)


SHAPE_SETS: dict[str, tuple[ConvShape, ...]] = {
    "resnet18": _resnet18(),
    "resnet50": _resnet50(),
    "mobilenetv2": _mobilenetv2(),
}


def get_shape_set(name: str) -> tuple[ConvShape, ...]:
    """The distinct conv layers of a named network; ValueError naming the choices otherwise."""
    if name not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {name!r}; expected one of {sorted(SHAPE_SETS)}")
    return SHAPE_SETS[name]


def find_layer(set_name: str, layer_name: str) -> ConvShape:
    """One layer of a named set by its name (e.g. ``("resnet18", "layer2.0.conv1")``)."""
    for shape in get_shape_set(set_name):
        if shape.name == layer_name:
            return shape
    names = [s.name for s in get_shape_set(set_name)]
    raise ValueError(f"shape set {set_name!r} has no layer {layer_name!r}; it has {names}")


_SHAPE_KEYS = {"cin", "cout", "hw", "h", "w", "k", "kh", "kw", "stride", "padding", "dilation",
               "groups", "name"}


def parse_shape(spec: str) -> ConvShape:
    """Parse ``--shape`` text: comma-separated ``key=value`` pairs.

    Required: ``cin``, ``cout``, the spatial size (``hw``, or ``h`` and ``w``) and the kernel
    (``k``, or ``kh`` and ``kw``). Optional: ``stride`` (1), ``padding`` (``dilation*(k//2)``),
    ``dilation`` (1), ``groups`` (1), ``name`` (``custom``). Example:
    ``cin=64,cout=128,hw=56,k=3,stride=2``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--shape must be comma-separated key=value pairs, got {spec!r}")
    values: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _SHAPE_KEYS:
            raise ValueError(
                f"--shape item {item!r} is not key=value with a key in {sorted(_SHAPE_KEYS)} "
                f"(in {spec!r})"
            )
        values[key] = value.strip()
    name = values.pop("name", "custom")
    ints: dict[str, int] = {}
    for key, value in values.items():
        try:
            ints[key] = int(value)
        except ValueError:
            raise ValueError(f"--shape {key} must be an integer, got {value!r}") from None
    for key, alternatives in (("cin", ()), ("cout", ()), ("h", ("hw",)), ("w", ("hw",)),
                              ("kh", ("k",)), ("kw", ("k",))):
        if key not in ints:
            for alt in alternatives:
                if alt in ints:
                    ints[key] = ints[alt]
                    break
            else:
                need = key if not alternatives else f"{key} (or {alternatives[0]})"
                raise ValueError(f"--shape needs {need}, got {spec!r}")
    dilation = ints.get("dilation", 1)
    padding = ints.get("padding", dilation * (ints["kh"] // 2))
    return ConvShape(name, ints["cin"], ints["cout"], ints["h"], ints["w"], ints["kh"],
                     ints["kw"], ints.get("stride", 1), padding, dilation, ints.get("groups", 1))


def tiny(shape: ConvShape, channels: int = 8, size: int = 6) -> ConvShape:
    """A miniature of ``shape`` for Triton's interpreter: same kernel, stride and kind of groups.

    Channels are capped at ``channels`` and the spatial size at ``size`` (but kept large enough
    for the dilated kernel). Depthwise stays depthwise; other grouped convs keep their groups if
    they still divide the capped channels, else become dense.
    """
    depthwise = shape.groups > 1 and shape.groups == shape.cin == shape.cout
    cin, cout = min(shape.cin, channels), min(shape.cout, channels)
    if depthwise:
        groups = cin = cout = min(cin, cout)
    elif cin % shape.groups == 0 and cout % shape.groups == 0:
        groups = shape.groups
    else:
        groups = 1
    reach_h = shape.dilation * (shape.kh - 1) + 1
    reach_w = shape.dilation * (shape.kw - 1) + 1
    h = 1 if shape.spatial_dims == 1 else max(min(shape.h, size), reach_h)
    w = max(min(shape.w, size), reach_w)
    d = shape.d
    if shape.spatial_dims == 3:
        d = max(min(shape.d, size), shape.dilation * (shape.kd - 1) + 1)
    return replace(shape, cin=cin, cout=cout, h=h, w=w, d=d, groups=groups)
