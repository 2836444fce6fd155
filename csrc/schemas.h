// The schemas of the bertkern operators, written once: csrc/ops.cpp defines the bertkern
// library from them, and the host emulation's test extensions (tests/emulation) define the same
// operators in their own namespace from them, so the two cannot drift. Semantics: ops.cpp.
#pragma once

namespace bertkern::schema {

inline constexpr const char kLayerNormFwd[] =
    "layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
    "bool store_residual) -> (Tensor y, Tensor residual_out, Tensor mean, Tensor rstd)";
inline constexpr const char kLayerNormBwd[] =
    "layer_norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor z, Tensor mean, Tensor rstd, "
    "Tensor? weight, bool has_bias) -> (Tensor dz, Tensor dweight, Tensor dbias)";
inline constexpr const char kMaskToIndices[] =
    "mask_to_indices(Tensor key_padding_mask) -> (Tensor indices, Tensor cu_seqlens, SymInt max_seqlen)";
inline constexpr const char kGatherRows[] = "gather_rows(Tensor x, Tensor indices) -> Tensor";
inline constexpr const char kScatterRows[] = "scatter_rows(Tensor x_packed, Tensor indices, SymInt n_rows) -> Tensor";
inline constexpr const char kAttentionFwd[] =
    "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
    "float scale, bool causal, float dropout_p, Tensor? dropout_seed) -> (Tensor out, Tensor lse)";
inline constexpr const char kAttentionBwd[] =
    "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor cu_seqlens, SymInt max_seqlen, float scale, bool causal, float dropout_p, "
    "Tensor? dropout_seed) -> (Tensor dq, Tensor dk, Tensor dv)";
inline constexpr const char kPhiloxWords[] = "_philox_words(int seed, Tensor offsets) -> Tensor";
inline constexpr const char kDropoutFwd[] = "dropout_fwd(Tensor x, float p, Tensor? seed, bool relu) -> Tensor";
inline constexpr const char kDropoutBwd[] =
    "dropout_bwd(Tensor grad, Tensor? y, float p, Tensor? seed, bool relu) -> Tensor";

}  // namespace bertkern::schema
