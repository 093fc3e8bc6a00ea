#include "prompt.h"

#include <stdexcept>

namespace llm {

Template::Template(const std::string & name, const llama_vocab * vocab)
    : name_(name), vocab_(vocab), bos_(llama_vocab_bos(vocab)), eos_(llama_vocab_eos(vocab)) {
    if (name == "human_assistant") {
        // A model that has not learned EOS yet runs on into an invented next turn: cut it there.
        stop_strings_ = {"\nHuman:"};
    } else if (name != "baichuan_chat") {
        throw std::invalid_argument("unknown template '" + name + "'; valid: human_assistant, baichuan_chat");
    }
    if (eos_ == LLAMA_TOKEN_NULL) {
        throw std::invalid_argument("template '" + name + "' needs a vocabulary with an EOS token");
    }
}

// Each text piece is tokenized on its own, without BOS/EOS, special-token text matched (as the transformers
// tokenizer called with add_special_tokens=False does).
std::vector<llama_token> Template::tokenize(const std::string & text) const {
    if (text.empty()) {
        return {};
    }
    int n = -llama_tokenize(vocab_, text.data(), (int32_t) text.size(), nullptr, 0, false, true);
    std::vector<llama_token> tokens(n);
    if (llama_tokenize(vocab_, text.data(), (int32_t) text.size(), tokens.data(), n, false, true) != n) {
        throw std::runtime_error("tokenization failed");
    }
    return tokens;
}

std::vector<llama_token> Template::encode_prompt(const std::vector<Turn> & history, const std::string & query,
                                                 const std::string & system) const {
    std::vector<llama_token> ids;
    auto append = [&ids](const std::vector<llama_token> & more) { ids.insert(ids.end(), more.begin(), more.end()); };
    std::vector<Turn> turns = history;
    turns.push_back({query, ""});
    for (size_t index = 0; index < turns.size(); ++index) {
        const Turn & turn = turns[index];
        if (name_ == "human_assistant") {  // <s>[system\n\n]Human: {q}\n\nAssistant: {a}</s>Human: ...
            if (index == 0) {
                if (bos_ != LLAMA_TOKEN_NULL) {
                    ids.push_back(bos_);
                }
                if (!system.empty()) {
                    append(tokenize(system + "\n\n"));
                }
            }
            append(tokenize("Human: " + turn.user + "\n\nAssistant: "));
        } else {  // [system][195] {q} [196] {a} </s> ...
            if (index == 0 && !system.empty()) {
                append(tokenize(system));
            }
            ids.push_back(BAICHUAN_USER_TOKEN_ID);
            append(tokenize(turn.user));
            ids.push_back(BAICHUAN_ASSISTANT_TOKEN_ID);
        }
        if (index + 1 < turns.size()) {  // an earlier turn: its reply and the EOS that ended it
            append(tokenize(turn.assistant));
            ids.push_back(eos_);
        }
    }
    return ids;
}

std::string Template::piece(llama_token token) const {
    char buffer[256];
    int n = llama_token_to_piece(vocab_, token, buffer, sizeof(buffer), 0, false);
    if (n < 0) {
        std::string long_piece(-n, '\0');
        n = llama_token_to_piece(vocab_, token, long_piece.data(), -n, 0, false);
        return long_piece.substr(0, n);
    }
    return std::string(buffer, n);
}

std::string Template::clean_answer(const std::vector<llama_token> & tokens) const {
    std::string text;
    for (llama_token token : tokens) {
        if (is_stop_token(token)) {
            break;
        }
        text += piece(token);
    }
    for (const std::string & stop : stop_strings_) {
        size_t at = text.find(stop);
        if (at != std::string::npos) {
            text.resize(at);
        }
    }
    return strip(text);
}

std::string strip(const std::string & text) {
    const char * space = " \t\n\r\f\v";
    size_t begin = text.find_first_not_of(space);
    if (begin == std::string::npos) {
        return "";
    }
    size_t end = text.find_last_not_of(space);
    return text.substr(begin, end - begin + 1);
}

}  // namespace llm
