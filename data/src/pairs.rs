//! Preference-pair files (JSON lines): text pairs `{"prompt","chosen","rejected"}`
//! and pre-tokenized pairs `{"prompt_ids","chosen_ids","rejected_ids"}` (TRL's
//! column names). A file is validated whole before anything uses it; the first bad
//! line is reported as `file:line: reason`.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{Error, Refusal, Result};
use crate::records::Layout;
use crate::tokenizer::TextTokenizer;

/// Which pair format a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PairFormat {
    /// Decided by the keys of the first record; every record must agree.
    #[default]
    Auto,
    Text,
    Tokens,
    /// Message lists rendered with the model's chat template.
    Chat,
}

impl FromStr for PairFormat {
    type Err = Refusal;
    fn from_str(s: &str) -> std::result::Result<Self, Refusal> {
        match s {
            "auto" => Ok(PairFormat::Auto),
            "text" => Ok(PairFormat::Text),
            "tokens" | "pretokenized" => Ok(PairFormat::Tokens),
            "conversational" | "chat" => Ok(PairFormat::Chat),
            other => Err(Refusal(format!(
                "unknown pair format {other:?} (expected auto, text, conversational or tokens)"
            ))),
        }
    }
}

/// One preference pair as it appears in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Pair {
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    Tokens {
        prompt: Vec<u32>,
        chosen: Vec<u32>,
        rejected: Vec<u32>,
    },
    /// Lists of `{"role", "content"}` messages.
    Chat {
        prompt: Value,
        chosen: Value,
        rejected: Value,
    },
}

/// A value with the 1-based line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub line: usize,
    pub value: T,
}

/// A pair as token ids, ready for the model: `prompt ++ chosen` and
/// `prompt ++ rejected` are the two sequences; only response tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    pub line: usize,
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

fn line_err(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Line {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn detect(obj: &Map<String, Value>) -> std::result::Result<PairFormat, Refusal> {
    if obj.contains_key("prompt_ids") || obj.contains_key("chosen_ids") {
        return Ok(PairFormat::Tokens);
    }
    match (obj.get("prompt"), obj.get("chosen")) {
        // A message-list prompt, or message-list responses whatever the prompt
        // (TRL's `maybe_extract_prompt`: a text prompt beside conversations, as
        // in UltraFeedback, is the conversations' first turns).
        (Some(Value::Array(_)), _) | (_, Some(Value::Array(_))) => Ok(PairFormat::Chat),
        (Some(Value::String(_)) | None, Some(_)) | (Some(Value::String(_)), None) => {
            Ok(PairFormat::Text)
        }
        (Some(other), _) => Err(Refusal::from(format!(
            "\"prompt\" must be a string, found {}",
            kind(other)
        ))),
        (None, None) => Err(Refusal::from(
            "not a preference pair: expected keys prompt/chosen/rejected, chosen/rejected \
             (the prompt their shared start), or prompt_ids/chosen_ids/rejected_ids",
        )),
    }
}

/// Where TRL's `extract_prompt` splits `chosen` and `rejected` into a shared
/// prompt and two responses: at their first difference, one earlier when the
/// item before it is a space; when one is a prefix of the other, one before the
/// shorter one's end (TRL's loop leaves its index there). Records TRL would
/// give an empty prompt, or identical responses, are refused.
pub fn implicit_prompt_len<T: PartialEq>(
    chosen: &[T],
    rejected: &[T],
    is_space: impl Fn(&T) -> bool,
) -> std::result::Result<usize, Refusal> {
    let m = chosen.len().min(rejected.len());
    if m == 0 {
        return Err(Refusal::from(
            "with no \"prompt\", chosen and rejected must both be non-empty (the prompt is their shared start)",
        ));
    }
    if chosen == rejected {
        return Err(Refusal::from(
            "chosen and rejected are identical: nothing to prefer",
        ));
    }
    let mut idx = m - 1;
    if let Some(i) = (0..m).find(|&i| chosen[i] != rejected[i]) {
        idx = i;
        if i > 0 && is_space(&chosen[i - 1]) {
            idx = i - 1;
        }
    }
    if idx == 0 {
        return Err(Refusal::from(
            "with no \"prompt\", chosen and rejected must start the same (the shared start is the prompt), and these differ from the first item",
        ));
    }
    Ok(idx)
}

use crate::records::kind;

fn text_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, Refusal> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(Refusal::from(format!(
            "\"{key}\" must be a string, found {}",
            kind(other)
        ))),
        None => Err(Refusal::from(format!("missing key \"{key}\""))),
    }
}

fn ids_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<Vec<u32>, Refusal> {
    let list = match obj.get(key) {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(Refusal::from(format!(
                "\"{key}\" must be a list of token ids, found {}",
                kind(other)
            )));
        }
        None => return Err(Refusal::from(format!("missing key \"{key}\""))),
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    Refusal::from(format!("\"{key}\"[{i}] is not a token id (found {v})"))
                })
        })
        .collect()
}

fn parse_pair(obj: &Map<String, Value>, format: PairFormat) -> std::result::Result<Pair, Refusal> {
    Ok(match format {
        PairFormat::Tokens => Pair::Tokens {
            prompt: ids_field(obj, "prompt_ids")?,
            chosen: ids_field(obj, "chosen_ids")?,
            rejected: ids_field(obj, "rejected_ids")?,
        },
        PairFormat::Chat => {
            let field = |key: &str| -> std::result::Result<Value, Refusal> {
                let v = obj
                    .get(key)
                    .ok_or_else(|| Refusal::from(format!("missing key \"{key}\"")))?;
                crate::chat::validate_messages(v, key)?;
                Ok(v.clone())
            };
            let (chosen, rejected) = (field("chosen")?, field("rejected")?);
            match obj.get("prompt") {
                Some(Value::Array(_)) => Pair::Chat {
                    prompt: field("prompt")?,
                    chosen,
                    rejected,
                },
                _ => {
                    let (c, r) = match (chosen, rejected) {
                        (Value::Array(c), Value::Array(r)) => (c, r),
                        _ => return Err(Refusal::from("messages must be lists")),
                    };
                    let at = implicit_prompt_len(&c, &r, |_| false)?;
                    Pair::Chat {
                        prompt: Value::Array(c[..at].to_vec()),
                        chosen: Value::Array(c[at..].to_vec()),
                        rejected: Value::Array(r[at..].to_vec()),
                    }
                }
            }
        }
        PairFormat::Text | PairFormat::Auto => {
            let (chosen, rejected) = (text_field(obj, "chosen")?, text_field(obj, "rejected")?);
            if obj.contains_key("prompt") {
                Pair::Text {
                    prompt: text_field(obj, "prompt")?,
                    chosen,
                    rejected,
                }
            } else {
                // Python slices strings by code point: so do we.
                let c: Vec<char> = chosen.chars().collect();
                let r: Vec<char> = rejected.chars().collect();
                let at = implicit_prompt_len(&c, &r, |ch| *ch == ' ')?;
                Pair::Text {
                    prompt: c[..at].iter().collect(),
                    chosen: c[at..].iter().collect(),
                    rejected: r[at..].iter().collect(),
                }
            }
        }
    })
}

/// The record keys a pair reader uses.
const PAIR_KEYS: &[&str] = &[
    "prompt",
    "chosen",
    "rejected",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
];

/// Reads every pair of a dataset (any file format [`crate::records`] reads).
/// Blank lines are skipped; any other record that is not a valid pair of the
/// dataset's format fails the whole read.
pub fn read_pairs(path: &Path, layout: &Layout, format: PairFormat) -> Result<Vec<Record<Pair>>> {
    read_pairs_skipping(path, layout, format, false).map(|(pairs, _)| pairs)
}

/// As [`read_pairs`]; with `skip_bad`, malformed records are returned as
/// errors beside the valid pairs instead of failing the read.
pub fn read_pairs_skipping(
    path: &Path,
    layout: &Layout,
    format: PairFormat,
    skip_bad: bool,
) -> Result<(Vec<Record<Pair>>, Vec<Error>)> {
    let mut out = Vec::new();
    let skipped = for_each_pair(path, layout, format, skip_bad, &mut |r| {
        out.push(r);
        Ok(())
    })?;
    Ok((out, skipped))
}

/// Reads `path`'s pairs one at a time into `each`, which may refuse one (the
/// read ends with its error): a record `each` does not keep is dropped as soon
/// as it returns, so a caller that tokenizes as it goes never holds the
/// dataset's text. With `skip_bad`, malformed records are returned as errors
/// instead of failing the read.
pub fn for_each_pair(
    path: &Path,
    layout: &Layout,
    format: PairFormat,
    skip_bad: bool,
    each: &mut dyn FnMut(Record<Pair>) -> Result<()>,
) -> Result<Vec<Error>> {
    let mut format = format;
    let mut format_line = 0usize;
    let mut read = 0usize;
    let mut skipped = Vec::new();
    for row in crate::records::open(path, layout, PAIR_KEYS)? {
        let row = row?;
        let n = row.at;
        let parsed = row
            .value
            .map_err(|r| line_err(path, n, r))
            .and_then(|obj| parse_record(path, n, &obj, &mut format, &mut format_line))
            .map_err(|e| crate::records::explain(e, layout));
        match parsed {
            Ok(pair) => {
                read += 1;
                each(Record {
                    line: n,
                    value: pair,
                })?;
            }
            Err(e) if skip_bad => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if read == 0 {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "no pairs in file".into(),
        });
    }
    Ok(skipped)
}

fn parse_record(
    path: &Path,
    n: usize,
    obj: &Map<String, Value>,
    format: &mut PairFormat,
    format_line: &mut usize,
) -> Result<Pair> {
    let detected = detect(obj).map_err(|r| line_err(path, n, r))?;
    match *format {
        PairFormat::Auto => {
            *format = detected;
            *format_line = n;
        }
        f if f != detected => {
            let what = |f: PairFormat| match f {
                PairFormat::Tokens => "pre-tokenized",
                PairFormat::Chat => "conversational",
                _ => "text",
            };
            let since = if *format_line > 0 {
                format!(" like line {}", *format_line)
            } else {
                " as requested".to_string()
            };
            return Err(line_err(
                path,
                n,
                format!(
                    "expected a {} pair{since}, found a {} pair",
                    what(f),
                    what(detected)
                ),
            ));
        }
        _ => {}
    }
    parse_pair(obj, *format).map_err(|r| line_err(path, n, r))
}

/// Turns pairs into token ids. Text pairs need `tokenizer`; pre-tokenized pairs are
/// used exactly as given. Every pair must end with a non-empty prompt (the first
/// response token needs a position to be predicted from) and non-empty responses.
pub fn tokenize_pairs(
    path: &Path,
    records: Vec<Record<Pair>>,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<TokenizedPair>> {
    records
        .into_iter()
        .map(|r| tokenize_pair(path, r, tokenizer))
        .collect()
}

/// One pair as token ids (see [`tokenize_pairs`]).
pub fn tokenize_pair(
    path: &Path,
    record: Record<Pair>,
    tokenizer: Option<&TextTokenizer>,
) -> Result<TokenizedPair> {
    let path: PathBuf = path.to_path_buf();
    let Record { line, value } = record;
    let (prompt, chosen, rejected) = match value {
        Pair::Tokens {
            prompt,
            chosen,
            rejected,
        } => (prompt, chosen, rejected),
        Pair::Chat {
            prompt,
            chosen,
            rejected,
        } => {
            let tok = tokenizer
                .ok_or_else(|| line_err(&path, line, "a conversational pair needs a tokenizer"))?;
            let template = tok.chat_template().ok_or_else(|| {
                        line_err(
                            &path,
                            line,
                            "a conversational pair needs the model's chat template (chat_template.jinja, or \
                             chat_template in tokenizer_config.json), and this model has none",
                        )
                    })?;
            let (p, r) = template
                .render_pair(&prompt, &[&chosen, &rejected])
                .map_err(|reason| line_err(&path, line, reason))?;
            let at_line = |e: Error| line_err(&path, line, e.to_string());
            (
                tok.encode_prompt(&p).map_err(at_line)?,
                tok.encode_chat_response(&r[0]).map_err(at_line)?,
                tok.encode_chat_response(&r[1]).map_err(at_line)?,
            )
        }
        Pair::Text {
            prompt,
            chosen,
            rejected,
        } => {
            let tok =
                tokenizer.ok_or_else(|| line_err(&path, line, "a text pair needs a tokenizer"))?;
            let at_line = |e: Error| line_err(&path, line, e.to_string());
            (
                tok.encode_prompt(&prompt).map_err(at_line)?,
                tok.encode_response(&chosen).map_err(at_line)?,
                tok.encode_response(&rejected).map_err(at_line)?,
            )
        }
    };
    if prompt.is_empty() {
        return Err(line_err(
            &path,
            line,
            "the prompt has no tokens, so the first response token has nothing to be predicted from",
        ));
    }
    for (name, ids) in [("chosen", &chosen), ("rejected", &rejected)] {
        if ids.is_empty() {
            return Err(line_err(
                &path,
                line,
                format!("the {name} response has no tokens"),
            ));
        }
    }
    Ok(TokenizedPair {
        line,
        prompt,
        chosen,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(lines.as_bytes()).expect("write");
        f
    }

    fn err(lines: &str, format: PairFormat) -> String {
        let f = file(lines);
        let e = read_pairs(f.path(), &Layout::default(), format)
            .expect_err("must fail")
            .to_string();
        let prefix = format!("{}:", f.path().display());
        assert!(e.starts_with(&prefix), "error names the file: {e}");
        e[prefix.len()..].to_string()
    }

    /// Pairs reach the caller one at a time as they are read (a bad record
    /// further on has not been read yet), and the caller's refusal ends the
    /// read at once.
    #[test]
    fn pairs_stream_to_the_caller_one_at_a_time() {
        let f = file(concat!(
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
            "{\"prompt\": \"d\", \"chosen\": \"e\", \"rejected\": \"f\"}\n",
            "{\"prompt\": 7}\n",
        ));
        let mut seen = Vec::new();
        let e = for_each_pair(
            f.path(),
            &Layout::default(),
            PairFormat::Auto,
            false,
            &mut |r| {
                seen.push(r.line);
                Ok(())
            },
        )
        .expect_err("line 3 is no pair");
        assert_eq!(
            seen,
            vec![1, 2],
            "each pair handed over before the next is read"
        );
        assert!(e.to_string().contains(":3:"), "{e}");
        let mut calls = 0;
        let e = for_each_pair(
            f.path(),
            &Layout::default(),
            PairFormat::Auto,
            false,
            &mut |r| {
                calls += 1;
                Err(line_err(f.path(), r.line, "refused by the caller"))
            },
        )
        .expect_err("refused");
        assert_eq!(calls, 1);
        assert!(e.to_string().ends_with(":1: refused by the caller"), "{e}");
    }

    #[test]
    fn reads_both_formats_and_skips_blank_lines() {
        let f = file(
            "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"extra\":1}\n\n{\"prompt\":\"d\",\"chosen\":\"e\",\"rejected\":\"f\"}\n",
        );
        let pairs = read_pairs(f.path(), &Layout::default(), PairFormat::Auto).expect("valid");
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].line, 3);
        assert_eq!(
            pairs[1].value,
            Pair::Text {
                prompt: "d".into(),
                chosen: "e".into(),
                rejected: "f".into()
            }
        );
        let f = file("{\"prompt_ids\":[1,2],\"chosen_ids\":[3],\"rejected_ids\":[4,5]}\n");
        let pairs = read_pairs(f.path(), &Layout::default(), PairFormat::Auto).expect("valid");
        assert_eq!(
            pairs[0].value,
            Pair::Tokens {
                prompt: vec![1, 2],
                chosen: vec![3],
                rejected: vec![4, 5]
            }
        );
    }

    #[test]
    fn bad_lines_name_line_and_reason() {
        let ok = "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n";
        assert_eq!(
            err(
                &format!("{ok}{{\"prompt\": \"a\", \"chosen\": \n"),
                PairFormat::Auto
            )
            .split(" at ")
            .next(),
            Some("2: invalid JSON: EOF while parsing a value")
        );
        assert_eq!(
            err(
                &format!("{ok}{ok}{{\"prompt\":\"a\",\"chosen\":\"b\"}}\n"),
                PairFormat::Auto
            ),
            "3: missing key \"rejected\""
        );
        assert_eq!(
            err(
                &format!("{ok}{{\"prompt\":\"a\",\"chosen\":7,\"rejected\":\"c\"}}\n"),
                PairFormat::Auto
            ),
            "2: \"chosen\" must be a string, found a number"
        );
        assert_eq!(
            err(
                &format!("{ok}{{\"prompt_ids\":[1],\"chosen_ids\":[2],\"rejected_ids\":[3]}}\n"),
                PairFormat::Auto
            ),
            "2: expected a text pair like line 1, found a pre-tokenized pair"
        );
        assert_eq!(
            err(
                "{\"prompt_ids\":[1],\"chosen_ids\":[2,-1],\"rejected_ids\":[3]}\n",
                PairFormat::Auto
            ),
            "1: \"chosen_ids\"[1] is not a token id (found -1)"
        );
        assert_eq!(
            err("[1,2]\n", PairFormat::Auto),
            "1: expected a JSON object, found a list"
        );
        assert_eq!(
            err(ok, PairFormat::Tokens),
            "1: expected a pre-tokenized pair as requested, found a text pair"
        );
        assert_eq!(
            err(
                "{\"prompt\":[{\"role\":\"user\",\"content\":\"x\"}],\"chosen\":\"y\",\"rejected\":[]}\n",
                PairFormat::Auto
            ),
            "1: \"chosen\" must be a list of messages"
        );
    }

    #[test]
    fn empty_file_and_empty_responses_are_rejected() {
        let f = file("\n\n");
        let e = read_pairs(f.path(), &Layout::default(), PairFormat::Auto)
            .expect_err("empty")
            .to_string();
        assert!(e.ends_with("no pairs in file"), "{e}");

        let f = file("{\"prompt_ids\":[1],\"chosen_ids\":[],\"rejected_ids\":[3]}\n");
        let pairs = read_pairs(f.path(), &Layout::default(), PairFormat::Auto).expect("parses");
        let e = tokenize_pairs(f.path(), pairs, None)
            .expect_err("empty chosen")
            .to_string();
        assert!(e.ends_with(":1: the chosen response has no tokens"), "{e}");

        let f = file("{\"prompt_ids\":[],\"chosen_ids\":[2],\"rejected_ids\":[3]}\n");
        let pairs = read_pairs(f.path(), &Layout::default(), PairFormat::Auto).expect("parses");
        let e = tokenize_pairs(f.path(), pairs, None)
            .expect_err("empty prompt")
            .to_string();
        assert!(e.contains(":1: the prompt has no tokens"), "{e}");
    }
}
