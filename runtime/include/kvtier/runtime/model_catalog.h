// Models the simulator can plan for: built-in presets taken from published
// Hugging Face configs, and any dense decoder's config.json.
//
// A preset is returned even when kvtier cannot run its shape; callers ask
// validate(preset) (core's validate(ModelShape) with the model's name) before
// using it, so an unsupported model is reported, never silently altered.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

#include "kvtier/core/shape.h"
#include "kvtier/core/status.h"

namespace kvtier::runtime {

struct ModelPreset {
  std::string name;          // "llama-3.1-8b", or a config's _name_or_path / folder name
  ModelShape shape;          // attention geometry; shape.dtype is the weights' and K/V's dtype
  uint64_t max_positions = 0;  // max_position_embeddings (seq_length for GLM)
  uint64_t parameters = 0;     // weight count, by estimate_parameters()
  uint64_t weights_bytes = 0;  // parameters x dtype bytes
  std::string source;        // where the numbers come from
  std::string notes;         // caveats a planner's user should know (long-context method, GQA group)
};

// The sizes a dense decoder's weight count follows from.
struct DenseArchitecture {
  uint32_t layers = 0;
  uint32_t q_heads = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  uint64_t hidden_size = 0;
  uint64_t intermediate_size = 0;  // per-layer MLP width (ffn_hidden_size for GLM)
  uint64_t vocab_size = 0;         // padded_vocab_size for GLM
  bool tie_word_embeddings = false;
  bool qkv_bias = false;
};

// Weights of a Llama-style decoder (gated MLP, RMSNorm, no MLP/output biases):
//   per layer  hidden x (q_heads + 2 kv_heads) x head_dim      q, k, v projections
//            + (q_heads + 2 kv_heads) x head_dim if qkv_bias
//            + q_heads x head_dim x hidden                     o projection
//            + 3 x hidden x intermediate                       gate, up, down
//            + 2 x hidden                                      two norms
//   total = layers x per layer + vocab x hidden (embeddings)
//         + vocab x hidden unless tied (LM head) + hidden (final norm).
// It reproduces the published counts of every preset exactly.
uint64_t estimate_parameters(const DenseArchitecture& arch);

// The built-in presets, in a fixed order.
std::span<const ModelPreset> model_presets();

// A preset by name (case-insensitive); unknown names list the known ones.
Result<ModelPreset> find_model(std::string_view name);

// A model from a Hugging Face config.json: Llama/Qwen2/Mistral style
// (num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
// hidden_size, intermediate_size, vocab_size, max_position_embeddings,
// torch_dtype, tie_word_embeddings) or GLM's chatglm style (num_layers,
// multi_query_attention + multi_query_group_num, kv_channels,
// ffn_hidden_size, padded_vocab_size, seq_length). Errors name the file and
// the field. The shape is not validated here: call validate().
Result<ModelPreset> load_model_config(const std::filesystem::path& path);

// Whether kvtier supports the model's shape; the message names the model.
Status validate(const ModelPreset& model);

}  // namespace kvtier::runtime
