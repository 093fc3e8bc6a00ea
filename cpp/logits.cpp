// llm_logits: what llama.cpp computes for given tokens, as JSON on stdout (the export checks compare it with
// transformers; see tests/export/test_llamacpp.py).
//
//   llm_logits -m model.gguf --tokens 1,5,9 [--generate N]   # {"logits": [[...] per position], "generated": [...]}
//   llm_logits -m model.gguf --tokenize TEXT                  # {"tokens": [...]} (no BOS/EOS, special text matched)
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm.h"

int main(int argc, char ** argv) {
    std::string model_path, tokens_arg, text;
    bool tokenize = false;
    int generate = 0, threads = 2;
    try {
        for (int i = 1; i < argc; ++i) {
            std::string arg = argv[i];
            if (i + 1 >= argc) {
                throw std::invalid_argument(arg + " needs a value");
            }
            std::string value = argv[++i];
            if (arg == "-m") {
                model_path = value;
            } else if (arg == "--tokens") {
                tokens_arg = value;
            } else if (arg == "--tokenize") {
                text = value;
                tokenize = true;
            } else if (arg == "--generate") {
                generate = std::stoi(value);
            } else if (arg == "-t") {
                threads = std::stoi(value);
            } else {
                throw std::invalid_argument("unknown argument '" + arg + "'");
            }
        }
        if (model_path.empty() || (tokens_arg.empty() && !tokenize)) {
            throw std::invalid_argument("usage: llm_logits -m MODEL.gguf (--tokens 1,2,3 [--generate N] | --tokenize TEXT)");
        }
        llm::quiet_logs();
        std::vector<llama_token> tokens;
        std::stringstream list(tokens_arg);
        for (std::string item; std::getline(list, item, ',');) {
            tokens.push_back(std::stoi(item));
        }
        llm::Model model(model_path, (int) tokens.size() + generate + 1, threads, /*f32_cache=*/true);
        if (tokenize) {
            int n = -llama_tokenize(model.vocab, text.data(), (int32_t) text.size(), nullptr, 0, false, true);
            std::vector<llama_token> ids(n);
            llama_tokenize(model.vocab, text.data(), (int32_t) text.size(), ids.data(), n, false, true);
            printf("{\"tokens\": [");
            for (int i = 0; i < n; ++i) {
                printf("%s%d", i ? ", " : "", ids[i]);
            }
            printf("]}\n");
            return 0;
        }
        model.decode(tokens, 0, true);
        int n_vocab = llama_vocab_n_tokens(model.vocab);
        printf("{\"logits\": [");
        for (size_t i = 0; i < tokens.size(); ++i) {
            const float * row = llama_get_logits_ith(model.ctx, (int32_t) i);
            printf("%s[", i ? ", " : "");
            for (int j = 0; j < n_vocab; ++j) {
                printf("%s%.9g", j ? ", " : "", row[j]);
            }
            printf("]");
        }
        printf("], \"generated\": [");
        int position = (int) tokens.size();
        for (int step = 0; step < generate; ++step) {
            llama_token next = model.argmax(step == 0 ? (int32_t) tokens.size() - 1 : -1);
            printf("%s%d", step ? ", " : "", next);
            if (step + 1 < generate) {
                model.decode({next}, position++, false);
            }
        }
        printf("]}\n");
    } catch (const std::exception & error) {
        fprintf(stderr, "error: %s\n", error.what());
        return 1;
    }
    return 0;
}
