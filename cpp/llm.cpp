#include "llm.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace llm {

void quiet_logs() {
    llama_log_set(
        [](enum ggml_log_level level, const char * text, void *) {
            if (level == GGML_LOG_LEVEL_ERROR) {
                fputs(text, stderr);
            }
        },
        nullptr);
}

std::map<std::string, std::string> options(int argc, char ** argv, const std::vector<std::string> & known) {
    std::map<std::string, std::string> values;
    for (int i = 1; i < argc; i += 2) {
        std::string option = argv[i];
        if (std::find(known.begin(), known.end(), option) == known.end()) {
            throw std::invalid_argument("unknown argument '" + option + "'");
        }
        if (i + 1 >= argc) {
            throw std::invalid_argument(option + " needs a value");
        }
        values[option] = argv[i + 1];
    }
    return values;
}

Model::Model(const std::string & path, int n_ctx, int n_threads, bool f32_cache, int n_seq_max) {
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    model_params.progress_callback = [](float, void *) { return true; };  // no loading dots
    model = llama_model_load_from_file(path.c_str(), model_params);
    if (!model) {
        throw std::runtime_error("cannot load model '" + path + "' (not a GGUF file llama.cpp reads?)");
    }
    vocab = llama_model_get_vocab(model);
    llama_context_params ctx_params = llama_context_default_params();
    ctx_params.n_ctx = n_ctx > 0 ? n_ctx : llama_model_n_ctx_train(model);
    ctx_params.n_batch = ctx_params.n_ctx;
    ctx_params.n_ubatch = ctx_params.n_ctx;
    ctx_params.n_seq_max = n_seq_max;
    ctx_params.n_threads = n_threads;
    ctx_params.n_threads_batch = n_threads;
    if (f32_cache) {
        ctx_params.type_k = GGML_TYPE_F32;
        ctx_params.type_v = GGML_TYPE_F32;
        ctx_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    ctx = llama_init_from_model(model, ctx_params);
    if (!ctx) {
        llama_model_free(model);
        throw std::runtime_error("cannot create a llama.cpp context for '" + path + "'");
    }
}

Model::~Model() {
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
}

std::string Model::meta(const std::string & key) const {
    char buffer[256];
    int n = llama_model_meta_val_str(model, key.c_str(), buffer, sizeof(buffer));
    return n < 0 ? "" : std::string(buffer);
}

void Model::decode(const std::vector<llama_token> & tokens, int start, bool all_logits) {
    llama_batch batch = llama_batch_init((int32_t) tokens.size(), 0, 1);
    for (size_t i = 0; i < tokens.size(); ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = start + (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = all_logits || i + 1 == tokens.size();
    }
    batch.n_tokens = (int32_t) tokens.size();
    int status = llama_decode(ctx, batch);
    llama_batch_free(batch);
    if (status != 0) {
        throw std::runtime_error("llama_decode failed with status " + std::to_string(status));
    }
}

llama_token Model::argmax(int i) {
    const float * logits = llama_get_logits_ith(ctx, i);
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token best = 0;
    for (llama_token token = 1; token < n_vocab; ++token) {
        if (logits[token] > logits[best]) {
            best = token;
        }
    }
    return best;
}

}  // namespace llm
