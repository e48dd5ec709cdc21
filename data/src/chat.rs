//! Chat templates: conversational pairs rendered to text with the model's own Jinja
//! template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`),
//! through minijinja with Python-compatible string methods.
//!
//! As TRL does it: the prompt is rendered with the generation prompt; a response is
//! the rendering of prompt + response with the rendered prompt removed from its front.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue, context};
use serde_json::Value;

use crate::error::{Error, Refusal, Result};

const NAME: &str = "chat";

/// A compiled chat template and the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// The template of a model directory, if it has one.
    pub fn from_dir(
        dir: &Path,
        tokenizer_config: &Value,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Option<Self>> {
        let file = dir.join("chat_template.jinja");
        let (source, text) = if file.exists() {
            let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
                path: file.clone(),
                source,
            })?;
            (file, text)
        } else {
            let path = dir.join("tokenizer_config.json");
            let text = match tokenizer_config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                    {
                        Some(t) => t.to_string(),
                        None => {
                            return Err(Error::File {
                                path,
                                reason:
                                    "chat_template is a list without a template named \"default\""
                                        .into(),
                            });
                        }
                    }
                }
                _ => return Ok(None),
            };
            (path, text)
        };
        let mut env = Environment::new();
        // transformers renders chat templates with these Jinja settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, text)
            .map_err(|e| Error::File {
                path: source.clone(),
                reason: format!("invalid chat template: {e}"),
            })?;
        Ok(Some(ChatTemplate {
            env,
            source,
            bos_token: bos.unwrap_or_default().to_string(),
            eos_token: eos.unwrap_or_default().to_string(),
        }))
    }

    /// Renders a message list.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, Refusal> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| Refusal(e.to_string()))?;
        template
            .render(context! {
                messages => JinjaValue::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Refusal(format!("chat template of {}: {e}", self.source.display())))
    }

    /// `(prompt_text, response_texts)` of a conversational example.
    pub fn render_pair(
        &self,
        prompt: &Value,
        responses: &[&Value],
    ) -> std::result::Result<(String, Vec<String>), Refusal> {
        let prompt_text = self.render(prompt, true)?;
        let mut out = Vec::with_capacity(responses.len());
        for response in responses {
            let mut all = prompt.as_array().cloned().unwrap_or_default();
            all.extend(response.as_array().cloned().unwrap_or_default());
            let full = self.render(&Value::Array(all), false)?;
            let Some(rest) = full.strip_prefix(&prompt_text) else {
                return Err(Refusal::from(
                    "the chat template does not render the prompt (with its generation prompt) as the start of \
                     the whole conversation, so the response cannot be separated from it",
                ));
            };
            out.push(rest.to_string());
        }
        Ok((prompt_text, out))
    }
}

/// Checks that `v` is a non-empty list of `{"role": str, "content": str}` messages.
pub fn validate_messages(v: &Value, key: &str) -> std::result::Result<(), Refusal> {
    let Value::Array(list) = v else {
        return Err(Refusal::from(format!(
            "\"{key}\" must be a list of messages"
        )));
    };
    if list.is_empty() {
        return Err(Refusal::from(format!("\"{key}\" has no messages")));
    }
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        if role.is_none() || content.is_none() {
            return Err(Refusal::from(format!(
                "\"{key}\"[{i}] must be an object with string \"role\" and \"content\""
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn template(text: &str) -> ChatTemplate {
        ChatTemplate::from_dir(
            Path::new("/nonexistent"),
            &json!({"chat_template": text}),
            Some("<s>"),
            Some("</s>"),
        )
        .expect("compiles")
        .expect("present")
    }

    #[test]
    fn renders_prompt_and_response_suffix() {
        let t = template(CHATML);
        let prompt = json!([{"role": "user", "content": " hi "}]);
        let chosen = json!([{"role": "assistant", "content": "hello"}]);
        let (p, r) = t.render_pair(&prompt, &[&chosen]).expect("renders");
        assert_eq!(p, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(r, vec!["hello<|im_end|>\n".to_string()]);
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}{{ m['content'].strip().upper() }}{% endfor %}",
        );
        assert_eq!(
            t.render(&json!([{"role": "user", "content": " a "}]), false)
                .expect("renders"),
            "<s>A"
        );
        let e = t
            .render(&json!([{"role": "tool", "content": "x"}]), false)
            .expect_err("raises");
        assert!(e.contains("bad role tool"), "{e}");
    }

    #[test]
    fn block_tags_trim_their_newline_as_transformers_does() {
        let t = template(
            "{% for m in messages %}\n  {% if true %}{{ m['content'] }}{% endif %}\n{% endfor %}\n",
        );
        assert_eq!(
            t.render(
                &json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                false
            )
            .expect("renders"),
            "ab"
        );
    }

    #[test]
    fn message_lists_are_validated() {
        assert!(validate_messages(&json!([{"role": "user", "content": "x"}]), "prompt").is_ok());
        assert_eq!(
            validate_messages(&json!("x"), "prompt").expect_err("bad"),
            "\"prompt\" must be a list of messages"
        );
        assert!(
            validate_messages(&json!([{"role": "user"}]), "chosen")
                .expect_err("bad")
                .contains("\"chosen\"[0]")
        );
    }
}
