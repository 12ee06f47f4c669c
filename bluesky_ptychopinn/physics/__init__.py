"""Ptychographic forward model and geometry in torch: device-agnostic, batched, differentiable.

Conventions (see docs/conventions.md): frames are photon counts with DC at (N//2, N//2); the far
field is ``fftshift(fft2(P * O, norm="ortho"))``; positions are probe centres (y, x) in object
pixels with the origin at the centre of pixel (0, 0); probes are (M, N, N) incoherent modes.
"""

from ._geometry import (
    HC_EV_M,
    ExperimentGeometry,
    object_pixel_size_m,
    pixels_to_stage,
    rescale_positions,
    stage_to_pixels,
    wavelength_m,
)
from ._patches import (
    PatchGeometry,
    extract_patches,
    patch_geometry,
    patch_origins,
    required_object_shape,
    scatter_patches,
)
from ._probes import (
    PROBE_MODELS,
    airy_probe,
    kb_probe,
    make_probe,
    mixed_state_probe,
    normalize_probe,
    pinhole_probe,
    probe_diameter_px,
    zone_plate_probe,
)
from ._propagation import back_propagate, diffraction_intensity, exit_waves, far_field
from ._resample import (
    bin_frames,
    crop_frames,
    crop_probe_real_space,
    probe_at_sampling,
    resample_object,
    resample_probe,
)
from ._scan import (
    SCAN_PATTERNS,
    concentric_circles_scan,
    fermat_spiral_scan,
    jittered_raster_scan,
    raster_scan,
    scan_pattern,
    step_from_overlap,
)
from ._simulate import SimulatedFrames, beamstop_mask, simulate_diffraction

__all__ = [
    "ExperimentGeometry",
    "HC_EV_M",
    "PROBE_MODELS",
    "make_probe",
    "SCAN_PATTERNS",
    "SimulatedFrames",
    "airy_probe",
    "back_propagate",
    "beamstop_mask",
    "bin_frames",
    "concentric_circles_scan",
    "crop_frames",
    "crop_probe_real_space",
    "diffraction_intensity",
    "exit_waves",
    "extract_patches",
    "far_field",
    "fermat_spiral_scan",
    "jittered_raster_scan",
    "kb_probe",
    "mixed_state_probe",
    "normalize_probe",
    "object_pixel_size_m",
    "patch_origins",
    "pinhole_probe",
    "pixels_to_stage",
    "probe_diameter_px",
    "raster_scan",
    "required_object_shape",
    "rescale_positions",
    "probe_at_sampling",
    "resample_object",
    "resample_probe",
    "scan_pattern",
    "scatter_patches",
    "patch_geometry",
    "PatchGeometry",
    "simulate_diffraction",
    "stage_to_pixels",
    "step_from_overlap",
    "wavelength_m",
    "zone_plate_probe",
]
