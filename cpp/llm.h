// Small helpers shared by llm_chat and llm_logits: load a GGUF model and run tokens through it.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "llama.h"

namespace llm {

struct Model {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    const llama_vocab * vocab = nullptr;

    // Loads `path` on the CPU with a context of n_ctx tokens (0 = the model's training context). The KV cache is
    // f16 (llama.cpp's default, half the memory) or, with f32_cache, f32 without flash attention: the
    // transformers computation up to summation order. n_seq_max sequences may share the context (llm_bench).
    // Throws on failure.
    Model(const std::string & path, int n_ctx, int n_threads, bool f32_cache = false, int n_seq_max = 1);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    // A GGUF metadata string, or "" when the key is absent.
    std::string meta(const std::string & key) const;

    // Runs `tokens` at positions start.. of sequence 0; logits are kept for every position when all_logits,
    // else for the last one only. Throws on failure.
    void decode(const std::vector<llama_token> & tokens, int start, bool all_logits);

    // The index of the largest logit at output row i (-1 = the last), ties to the lowest id (as torch.argmax).
    llama_token argmax(int i = -1);
};

// Only llama.cpp's errors reach stderr.
void quiet_logs();

// A command line of "--option value" pairs, each option one of `known`; throws std::invalid_argument otherwise.
std::map<std::string, std::string> options(int argc, char ** argv, const std::vector<std::string> & known);

}  // namespace llm
