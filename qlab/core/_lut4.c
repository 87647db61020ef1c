/* qlab.core._lut4: the one-pass decode of packed 4-bit codes (qlab/core/decode4.py) in C, for one instruction
 * that numba does not emit: AVX-512's 16-lane table permute (vpermps) looks 16 codes up in a 16-entry table
 * held in a register. Per group of L values (L even, so no group starts inside a byte):
 *
 *     T[i]           = (table[i] - zero_point) * scale      (or table[i] * scale + minimum, or table[i] * scale)
 *     x_hat[2j]      = T[byte_j & 15]                        (low nibble first)
 *     x_hat[2j + 1]  = T[byte_j >> 4]
 *
 * T[i] is computed with the float32 operations of decode4._decode4, in the same order and never fused (built
 * with -ffp-contract=off), so both give the same bits. Without AVX-512 (or on another CPU family) the same
 * loop runs one byte at a time. The GIL is released: Python threads may decode disjoint ranges of groups.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QLAB_X86 1
#include <immintrin.h>
#endif

enum { PLAIN, ZERO_POINT, MINIMUM };

typedef struct {
    const uint8_t *packed;
    const float *table, *scale, *zero_point, *minimum;
    Py_ssize_t n, L;
    int mode;
    float *out;
} job_t;

/* the group's 16 values T[i] */
static void group_table(const job_t *J, Py_ssize_t g, float *T) {
    const float s = J->scale[g];
    for (int i = 0; i < 16; i++) {
        if (J->mode == MINIMUM) T[i] = J->table[i] * s + J->minimum[g];
        else if (J->mode == ZERO_POINT) T[i] = (J->table[i] - J->zero_point[g]) * s;
        else T[i] = J->table[i] * s;
    }
}

static void bytes_scalar(const uint8_t *pb, Py_ssize_t nbytes, const float *T, float *out) {
    for (Py_ssize_t j = 0; j < nbytes; j++) {
        out[2 * j] = T[pb[j] & 15];
        out[2 * j + 1] = T[pb[j] >> 4];
    }
}

static void decode_groups(const job_t *J, Py_ssize_t g0, Py_ssize_t g1) {
    float T[16];
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t start = g * J->L, stop = start + J->L < J->n ? start + J->L : J->n;
        group_table(J, g, T);
        bytes_scalar(J->packed + (start >> 1), (stop >> 1) - (start >> 1), T, J->out + start);
        if (stop & 1)  /* an odd count: the last byte holds one code, in its low nibble */
            J->out[stop - 1] = T[J->packed[stop >> 1] & 15];
    }
}

#ifdef QLAB_X86
/* The same with T in a register: 16 bytes per step are widened to 16 int32, split into nibbles and
 * interleaved (low, high, low, ...) into two vectors of 16 codes, each permuting T. The whole function is
 * compiled for AVX-512 (no SSE code between the vector loops, whose switch costs hundreds of cycles). */
__attribute__((target("avx512f")))
static void decode_groups_avx512(const job_t *J, Py_ssize_t g0, Py_ssize_t g1) {
    const __m512 table = _mm512_loadu_ps(J->table);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i nibble = _mm512_set1_epi32(15);
    float T[16];
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t start = g * J->L, stop = start + J->L < J->n ? start + J->L : J->n;
        const __m512 s = _mm512_set1_ps(J->scale[g]);
        __m512 t = J->mode == MINIMUM ? _mm512_add_ps(_mm512_mul_ps(table, s), _mm512_set1_ps(J->minimum[g]))
                 : J->mode == ZERO_POINT ? _mm512_mul_ps(_mm512_sub_ps(table, _mm512_set1_ps(J->zero_point[g])), s)
                 : _mm512_mul_ps(table, s);
        const uint8_t *pb = J->packed + (start >> 1);
        float *out = J->out + start;
        Py_ssize_t nbytes = (stop >> 1) - (start >> 1), j = 0;
        for (; j + 16 <= nbytes; j += 16) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pb + j)));
            __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_srli_epi32(b, 4);
            _mm512_storeu_ps(out + 2 * j, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, first, hi), t));
            _mm512_storeu_ps(out + 2 * j + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, second, hi), t));
        }
        if (j < nbytes || (stop & 1)) {
            _mm512_storeu_ps(T, t);
            for (; j < nbytes; j++) {
                out[2 * j] = T[pb[j] & 15];
                out[2 * j + 1] = T[pb[j] >> 4];
            }
            if (stop & 1)
                J->out[stop - 1] = T[J->packed[stop >> 1] & 15];
        }
    }
    _mm256_zeroupper();
}
#endif

static int use_avx512;

/* a float32 buffer of at least `need` items, or None (allowed when `optional`) */
static int get_floats(PyObject *obj, Py_buffer *view, Py_ssize_t need, int optional, const char *name) {
    view->obj = NULL;
    if (obj == Py_None && optional) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 4 || !view->format || strcmp(view->format, "f") || view->len / 4 < need) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous float32 array of at least %zd values", name, need);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(decode_doc,
"decode(packed, n, table, L, scale, zero_point, minimum, out, g0, g1)\n\n"
"Writes the values of groups g0..g1-1 into out (float32, n values): L consecutive values per group, packed two\n"
"codes per byte (low nibble first); zero_point / minimum are None or one float32 per group.");

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer packed, table, scale, zp, mn, out;
    PyObject *table_o, *scale_o, *zp_o, *mn_o, *out_o;
    Py_ssize_t n, L, g0, g1;
    if (!PyArg_ParseTuple(args, "y*nOnOOOOnn", &packed, &n, &table_o, &L, &scale_o, &zp_o, &mn_o, &out_o, &g0, &g1))
        return NULL;
    PyObject *result = NULL;
    table.obj = scale.obj = zp.obj = mn.obj = out.obj = NULL;
    Py_ssize_t n_groups = L > 0 ? (n + L - 1) / L : 0;
    if (L <= 0 || L % 2 || n < 0 || packed.len < (n + 1) / 2 || g0 < 0 || g1 > n_groups || g0 > g1) {
        PyErr_Format(PyExc_ValueError, "decode: need an even L > 0, (n + 1) / 2 packed bytes and 0 <= g0 <= g1 <= "
                     "%zd groups; got L=%zd, n=%zd, %zd bytes, g0=%zd, g1=%zd", n_groups, L, n, packed.len, g0, g1);
        goto done;
    }
    if (get_floats(table_o, &table, 16, 0, "table") || get_floats(scale_o, &scale, n_groups, 0, "scale") ||
        get_floats(zp_o, &zp, n_groups, 1, "zero_point") || get_floats(mn_o, &mn, n_groups, 1, "minimum") ||
        get_floats(out_o, &out, n, 0, "out"))
        goto done;
    if (out.readonly) {
        PyErr_SetString(PyExc_ValueError, "out must be writable");
        goto done;
    }
    job_t J = {packed.buf, table.buf, scale.buf, zp.obj ? zp.buf : NULL, mn.obj ? mn.buf : NULL, n, L,
               mn.obj ? MINIMUM : zp.obj ? ZERO_POINT : PLAIN, out.buf};
    Py_BEGIN_ALLOW_THREADS
#ifdef QLAB_X86
    if (use_avx512) decode_groups_avx512(&J, g0, g1);
    else
#endif
        decode_groups(&J, g0, g1);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&packed);
    Py_buffer *views[] = {&table, &scale, &zp, &mn, &out};
    for (int i = 0; i < 5; i++)
        if (views[i]->obj) PyBuffer_Release(views[i]);
    return result;
}

static PyMethodDef methods[] = {{"decode", decode, METH_VARARGS, decode_doc}, {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lut4",
                                    "4-bit table decode with AVX-512 permutes (qlab/core/decode4.py).", -1, methods};

PyMODINIT_FUNC PyInit__lut4(void) {
#ifdef QLAB_X86
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "simd", use_avx512 ? "avx512" : "none") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
