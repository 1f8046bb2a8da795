"""Where an output image of a slide region lies on the slide (:class:`Placement`).

It goes into the summary JSON and into the OME-XML of every OME-TIFF written for a slide: a ``Plane``
with ``PositionX/Y`` in µm (the OME way to say where a plane was imaged; needs the slide's µm/px)
and a ``MapAnnotation`` (namespace :data:`PLACEMENT_NAMESPACE`) with the values in level-0 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape

PLACEMENT_NAMESPACE = "wsss/placement"


@dataclass(frozen=True)
class Placement:
    """Where an image of a slide region lies: ``origin`` (level-0 ``x, y`` of its top-left corner, in
    OpenSlide's pixels), ``downsample`` (level-0 pixels per image pixel, ``x, y``), ``mpp`` (µm per
    image pixel, None when the slide records none) and ``qupath_offset`` (level-0 ``x, y`` where
    QuPath's picture of the slide starts: its bounds, when QuPath crops to them)."""

    origin: tuple[float, float] = (0.0, 0.0)
    downsample: tuple[float, float] = (1.0, 1.0)
    mpp: tuple[float, float] | None = None
    qupath_offset: tuple[float, float] = (0.0, 0.0)

    @property
    def qupath_origin(self) -> tuple[float, float]:
        """The top-left corner in QuPath's pixel coordinates of the slide."""
        return self.origin[0] - self.qupath_offset[0], self.origin[1] - self.qupath_offset[1]

    @property
    def origin_um(self) -> tuple[float, float] | None:
        """The top-left corner in µm from the slide's level-0 (0, 0); None without µm/px."""
        if self.mpp is None:
            return None
        return (self.origin[0] * self.mpp[0] / self.downsample[0], self.origin[1] * self.mpp[1] / self.downsample[1])

    def qupath_affine(self) -> list[list[float]]:
        """The 2 × 3 affine transform from QuPath's slide pixels to this image's pixels, the matrix
        QuPath's image alignment overlay takes (it paints the overlay through the inverse)."""
        (ox, oy), (dx, dy) = self.qupath_origin, self.downsample
        return [[1 / dx, 0.0, -ox / dx], [0.0, 1 / dy, -oy / dy]]

    def to_json(self) -> dict:
        return {"origin": list(self.origin), "origin_qupath": list(self.qupath_origin),
                "origin_um": list(self.origin_um) if self.origin_um is not None else None,
                "downsample": list(self.downsample), "mpp": list(self.mpp) if self.mpp is not None else None,
                "qupath_affine": self.qupath_affine()}

    def ome_planes(self, channels: int) -> str:
        """One OME ``Plane`` per channel with the corner's position in µm (none without µm/px)."""
        um = self.origin_um
        if um is None:
            return ""
        return "".join(f'<Plane TheZ="0" TheT="0" TheC="{c}" PositionX="{um[0]!r}" PositionXUnit="&#181;m" '
                       f'PositionY="{um[1]!r}" PositionYUnit="&#181;m"/>' for c in range(channels))

    def ome_annotation(self, annotation_id: str) -> str:
        """A ``MapAnnotation`` with the placement in level-0 pixels."""
        values = {"origin_x": self.origin[0], "origin_y": self.origin[1],
                  "qupath_origin_x": self.qupath_origin[0], "qupath_origin_y": self.qupath_origin[1],
                  "downsample_x": self.downsample[0], "downsample_y": self.downsample[1],
                  "units": "level-0 pixels of the slide"}
        entries = "".join(f'<M K="{k}">{escape(v if isinstance(v, str) else repr(float(v)))}</M>'
                          for k, v in values.items())
        return (f'<MapAnnotation ID="{annotation_id}" Namespace="{PLACEMENT_NAMESPACE}">'
                f'<Value>{entries}</Value></MapAnnotation>')
