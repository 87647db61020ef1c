"""Training through the quantizer: QAT Linears with STE or learned (LSQ) steps, BitNet b1.58's BitLinear,
and a small resumable training loop.

* ``qat``    QATLinear, prepare(model, recipe) / convert(model, QuantLinear), naive_gradients
* ``lsq``    Learned Step Size Quantization (Esser et al. 2020): steps as parameters, eq. 1-5
* ``bitnet`` BitLinear (absmean ternary weights, per-token int8 activations, RMSNorm, STE); 5 trits per byte
* ``loop``   train(): AdamW, tqdm, checkpoints every N steps, resume, refuse foreign checkpoints, stop on NaN
"""
from qlab.methods.train.bitnet import BitLinear, bitnet_model, pack_trits, unpack_trits
from qlab.methods.train.loop import TrainLog, lr_factor, train
from qlab.methods.train.lsq import LSQWeight, lsq_fake_quant
from qlab.methods.train.qat import ACT_INT8_TOKEN, QATLinear, QuantizedInput, convert, naive_gradients, prepare

__all__ = ["ACT_INT8_TOKEN", "QATLinear", "QuantizedInput", "prepare", "convert", "naive_gradients", "LSQWeight",
           "lsq_fake_quant", "BitLinear", "bitnet_model", "pack_trits", "unpack_trits", "train", "TrainLog",
           "lr_factor"]
