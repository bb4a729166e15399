"""The Pisces special tokens and the chat templates (Llama 3, and ChatML for Qwen-style LLMs), defined once."""

IMAGE_TOKEN = "<image>"
BOI_TOKEN = "<boi>"
EOI_TOKEN = "<eoi>"
GEN_TOKEN = "<gen>"

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Llama 3 chat format. A content item {"type": "image"} renders as one <image> placeholder (the processor expands it
# to `num_image_tokens` copies), {"type": "text", "text": ...} as its text; plain string content is used as is.
# Assistant turns are wrapped in {% generation %} so `return_assistant_tokens_mask=True` can mask them for training.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- '" + BEGIN_OF_TEXT + "' -}}"
    "{%- for message in messages -%}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '" + END_OF_TURN + "' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render_content(message['content']) + '" + END_OF_TURN + "' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + START_HEADER + "assistant" + END_HEADER + "\\n\\n' -}}"
    "{%- endif -%}"
)

# A ChatML template (Qwen's turn format) with Pisces' image rendering: `{"type": "image"}` renders as `<image>`.
# Used for the processor when the LLM's tokenizer speaks ChatML and its own template cannot render images.
CHATML_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- render_content(message['content']) + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
