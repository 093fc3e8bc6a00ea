// Prompt rendering and answer cleaning, token for token as component/data/template.py and
// component/inference/engine.py do it, so the C++ chat asks a fine-tuned model exactly what training showed it.
#pragma once

#include <string>
#include <vector>

#include "llama.h"

namespace llm {

struct Turn {
    std::string user;
    std::string assistant;
};

// The role tokens of Baichuan-13B-Chat / Baichuan2-Chat (template.py: BAICHUAN_*_TOKEN_ID).
constexpr llama_token BAICHUAN_USER_TOKEN_ID = 195;
constexpr llama_token BAICHUAN_ASSISTANT_TOKEN_ID = 196;

class Template {
  public:
    // name: "human_assistant" or "baichuan_chat"; throws std::invalid_argument otherwise.
    Template(const std::string & name, const llama_vocab * vocab);

    // History turns in full, then the new query's prompt part (Template.encode_prompt).
    std::vector<llama_token> encode_prompt(const std::vector<Turn> & history, const std::string & query,
                                           const std::string & system) const;

    // Tokens that end a reply, and text that also ends it (Template.stop_token_ids / stop_strings).
    bool is_stop_token(llama_token token) const { return token == eos_; }
    const std::vector<std::string> & stop_strings() const { return stop_strings_; }

    // The reply text of generated tokens up to a stop token, cut at a stop string, stripped (clean_answer).
    std::string clean_answer(const std::vector<llama_token> & tokens) const;

    // Bytes of one token as the answer shows it (special tokens hidden, as skip_special_tokens=True).
    std::string piece(llama_token token) const;

    const std::string & name() const { return name_; }

  private:
    std::vector<llama_token> tokenize(const std::string & text) const;

    std::string name_;
    const llama_vocab * vocab_;
    llama_token bos_;
    llama_token eos_;
    std::vector<std::string> stop_strings_;
};

// Leading and trailing whitespace removed, as Python's str.strip() does for ASCII whitespace.
std::string strip(const std::string & text);

}  // namespace llm
