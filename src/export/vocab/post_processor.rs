//! The tokenizer.json post-processor's part in gguf-py's `SpecialVocab`: which special tokens are
//! added around a sequence (ByteLevel adds none, RobertaProcessing bos/eos/sep, TemplateProcessing
//! what its `single`/`pair` templates name), updating tokenizer_config.json's special tokens as
//! gguf-py does, with Python's truthiness and comparisons.

use super::special::SpecialVocab;
use serde_json::{Map, Value as Json};

/// Python's truthiness of an optional JSON value.
pub(super) fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

/// `item["SpecialToken"]["id"]` of a TemplateProcessing piece, when it is a nonempty string.
fn special_id(item: Option<&Json>) -> Option<Json> {
    let id = item?.get("SpecialToken")?.get("id")?;
    truthy(Some(id)).then(|| id.clone())
}

/// `item["Sequence"]["id"]` of a TemplateProcessing piece.
fn sequence_id(item: &Json) -> Option<&str> {
    item.get("Sequence")?.get("id")?.as_str()
}

/// Whether `x` equals one of `options` (Python's `x in (a, b)`; absent values equal nothing).
fn is_one_of(x: &Json, options: [&Option<Json>; 2]) -> bool {
    options.iter().any(|o| o.as_ref() == Some(x))
}

/// The post-processor's bos/eos/sep handling (ByteLevel, RobertaProcessing, and a simple
/// TemplateProcessing), updating tokenizer_config's special tokens as gguf-py does.
pub(super) fn read_post_processor(
    sv: &mut SpecialVocab,
    tj: &Json,
    tc: &mut Option<Map<String, Json>>,
    types: &mut Vec<&'static str>,
) {
    let get = |tc: &Option<Map<String, Json>>, k: &str| tc.as_ref().and_then(|m| m.get(k)).cloned();
    let tc_truthy = |tc: &Option<Map<String, Json>>| tc.as_ref().is_some_and(|m| !m.is_empty());
    let set = |tc: &mut Option<Map<String, Json>>, k: &str, v: &Json| {
        if let Some(m) = tc.as_mut() {
            m.insert(k.to_string(), v.clone());
        }
    };
    let mut special_bos = get(tc, "bos_token");
    let mut special_cls = get(tc, "cls_token");
    let mut special_eos = get(tc, "eos_token");
    let mut special_sep = get(tc, "sep_token");
    if !truthy(special_bos.as_ref()) && truthy(special_cls.as_ref()) && tc_truthy(tc) {
        set(tc, "bos_token", special_cls.as_ref().expect("truthy"));
        special_bos = special_cls.clone();
    }
    if !truthy(special_eos.as_ref()) && truthy(special_sep.as_ref()) && tc_truthy(tc) {
        set(tc, "eos_token", special_sep.as_ref().expect("truthy"));
        special_eos = special_sep.clone();
    }
    let Some(pp) = tj.get("post_processor").filter(|p| truthy(Some(p))) else {
        return;
    };
    let processors: Vec<&Json> = match pp.get("processors").and_then(|p| p.as_array()) {
        Some(list) => list.iter().collect(),
        None => vec![pp],
    };
    for processor in processors {
        match processor.get("type").and_then(|t| t.as_str()) {
            Some("ByteLevel") => {
                for typ in ["bos", "eos"] {
                    if !sv.add.iter().any(|(t, _)| *t == typ) {
                        sv.add.push((typ, false));
                    }
                }
            }
            Some("RobertaProcessing") => {
                sv.set_add("bos", true);
                sv.set_add("eos", true);
                sv.set_add("sep", true);
                let first = |key: &str, default: &Option<Json>| -> Json {
                    processor
                        .get(key)
                        .and_then(|v| v.as_array())
                        .and_then(|a| a.first())
                        .cloned()
                        .unwrap_or_else(|| default.clone().unwrap_or(Json::Null))
                };
                if !truthy(special_cls.as_ref()) && tc_truthy(tc) {
                    let v = first("cls", &special_bos);
                    set(tc, "cls_token", &v);
                    special_cls = Some(v);
                }
                if !truthy(special_sep.as_ref()) && tc_truthy(tc) {
                    let v = first("sep", &special_eos);
                    set(tc, "sep_token", &v);
                    special_sep = Some(v);
                }
            }
            Some("TemplateProcessing") => {
                let list = |k: &str| -> Vec<Json> {
                    processor
                        .get(k)
                        .and_then(|v| v.as_array())
                        .cloned()
                        .unwrap_or_default()
                };
                let (single, pair) = (list("single"), list("pair"));
                let mut special_first = None;
                let mut special_last = None;
                if single.len() > 1 {
                    special_first = special_id(single.first());
                    if let Some(first) = &special_first {
                        if !tc_truthy(tc) {
                            special_bos = Some(first.clone());
                        } else if !is_one_of(first, [&special_bos, &special_cls]) {
                            if !truthy(special_bos.as_ref()) {
                                set(tc, "bos_token", first);
                                special_bos = Some(first.clone());
                            }
                            if !truthy(special_cls.as_ref()) {
                                set(tc, "cls_token", first);
                                special_cls = Some(first.clone());
                            }
                        }
                        let add = is_one_of(first, [&special_bos, &special_cls]);
                        sv.set_add("bos", add);
                    }
                    special_last = special_id(single.last());
                    if let Some(last) = &special_last {
                        if !tc_truthy(tc) {
                            special_eos = Some(last.clone());
                        } else if special_eos.as_ref() != Some(last) {
                            let old_eos = special_eos.clone().unwrap_or(Json::Null);
                            if !types.contains(&"eot") {
                                types.push("eot");
                                set(tc, "eot_token", &old_eos);
                            } else if !types.contains(&"eom") {
                                types.push("eom");
                                set(tc, "eom_token", &old_eos);
                            }
                            set(tc, "eos_token", last);
                            special_eos = Some(last.clone());
                        }
                        let add = special_eos.as_ref() == Some(last);
                        sv.set_add("eos", add);
                    }
                }
                if !pair.is_empty() {
                    let start = usize::from(
                        special_first.is_some() && special_id(pair.first()) == special_first,
                    );
                    let stop = pair.len()
                        - usize::from(
                            special_last.is_some() && special_id(pair.last()) == special_last,
                        );
                    let pair = if start < stop {
                        &pair[start..stop]
                    } else {
                        &[][..]
                    };
                    if let (Some(a), Some(b)) = (pair.first(), pair.last())
                        && sequence_id(a) == Some("A")
                        && sequence_id(b) == Some("B")
                        && pair.len() > 2
                    {
                        let middle = &pair[1..pair.len() - 1];
                        let mut add_sep = false;
                        if let Some(entry) = special_id(middle.first())
                            && is_one_of(&entry, [&special_sep, &special_eos])
                            && special_last.is_none()
                        {
                            add_sep = true;
                        }
                        if middle.len() == 2
                            && let Some(entry) = special_id(middle.get(1))
                            && is_one_of(&entry, [&special_sep, &special_eos])
                        {
                            add_sep = true;
                        }
                        sv.set_add("sep", add_sep);
                        if add_sep && !truthy(special_sep.as_ref()) && tc_truthy(tc) {
                            set(tc, "sep_token", &special_eos.clone().unwrap_or(Json::Null));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}
