"""Triton kernels for low-bit inference, each beside the torch reference it must agree with.

Each module holds one kernel family: the Triton kernel(s), a ``*_reference`` torch function that
computes the same thing plainly, and a public function that dispatches between them
(``backend='torch' | 'triton' | 'interpret'``, or the ``QLAB_KERNELS`` environment variable; see
:mod:`qlab.kernels.dispatch`). Triton is optional: without it everything runs the references.
"""
