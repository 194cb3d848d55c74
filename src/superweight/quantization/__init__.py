"""Super-weight-aware quantization: block-wise round-to-nearest weights and simulated W8A8.

Weights (``weights``, ``blockwise``): min-max INT or normal-float levels per block of
contiguous elements, after optional outlier clipping, with the super weights restored
in full precision afterwards. Activations (``activations``, ``smoothquant``): 8-bit
per-tensor weights and per-token activations, plain, with super activations held out,
or after SmoothQuant smoothing. ``packing`` stores quantized weights in low-bit form.
"""

from superweight.quantization.activations import (
    ActivationQuantConfig,
    ActivationQuantReport,
    fake_quantize_per_tensor,
    fake_quantize_per_token,
    fake_quantize_per_token_holding_out,
    quantize_activations_,
    simulated_w8a8,
    super_activation_channels,
)
from superweight.quantization.calibration import ZScoreSearchResult, calibration_batch, search_zscore
from superweight.quantization.config import (
    ClipSpec,
    WeightQuantConfig,
    parse_block_size,
    parse_clip,
    parse_manual_quantize,
)
from superweight.quantization.packing import PackedReport, load_quantized_, save_quantized
from superweight.quantization.smoothquant import SmoothQuantReport, smooth_
from superweight.quantization.weights import (
    MatrixReport,
    QuantizationReport,
    TensorQuantStats,
    default_weight_filter,
    linear_modules,
    quantize_tensor,
    quantize_weights_,
    quantized_weights,
)

__all__ = [
    "ActivationQuantConfig",
    "ActivationQuantReport",
    "ClipSpec",
    "MatrixReport",
    "PackedReport",
    "QuantizationReport",
    "SmoothQuantReport",
    "TensorQuantStats",
    "WeightQuantConfig",
    "ZScoreSearchResult",
    "calibration_batch",
    "default_weight_filter",
    "fake_quantize_per_tensor",
    "fake_quantize_per_token",
    "fake_quantize_per_token_holding_out",
    "linear_modules",
    "load_quantized_",
    "parse_block_size",
    "parse_clip",
    "parse_manual_quantize",
    "quantize_activations_",
    "quantize_tensor",
    "quantize_weights_",
    "quantized_weights",
    "save_quantized",
    "search_zscore",
    "simulated_w8a8",
    "smooth_",
    "super_activation_channels",
]
