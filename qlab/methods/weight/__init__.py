"""Weight quantizers: one file per method (RTN, GPTQ, AWQ, GGUF block formats), each registered in
``qlab.methods.METHODS``."""
