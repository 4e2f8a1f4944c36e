//! Mutations of a valid seed file, as proptest strategies (so a failure shrinks to a few edits):
//! byte edits (bit flips, overwrites, integers of awkward sizes written over the file or over its
//! known length fields, inserted dictionary tokens or random bytes, deletions, truncations,
//! duplicated chunks) and, for JSON, edits of the parsed document (a value replaced by one of
//! another type or by a huge or negative number, removed, duplicated, stringified, wrapped).

use proptest::prelude::*;
use serde_json::Value;

/// Integers that break length, count, offset and dimension arithmetic.
const AWKWARD: [u64; 20] = [
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    (1 << 53) + 1,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 7,
    u64::MAX,
];

/// One byte-level edit; positions are taken modulo the length at the time it is applied.
#[derive(Debug, Clone)]
pub enum Edit {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        byte: u8,
    },
    /// A little-endian integer of `width` bytes written over the file at `at`.
    PutInt {
        at: usize,
        width: u8,
        value: u64,
    },
    /// The same, over the `field`-th known length/count/offset field of the seed.
    PutField {
        field: usize,
        value: u64,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        n: usize,
    },
    Truncate {
        at: usize,
    },
    /// Copies `n` bytes from `from` to `to` (duplicated records, fields out of order).
    Splice {
        from: usize,
        n: usize,
        to: usize,
    },
}

fn awkward() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => proptest::sample::select(AWKWARD.to_vec()),
        1 => any::<u64>(),
        1 => 0u64..4096,
    ]
}

/// Byte edits; `dict` holds tokens of the format worth inserting, `fields` how many known field
/// positions the seed has (each `PutField` picks one; with none, it writes at byte 0).
pub fn edit(dict: &'static [&'static [u8]]) -> impl Strategy<Value = Edit> {
    let at = any::<u32>().prop_map(|x| x as usize);
    prop_oneof![
        3 => (at.clone(), 0u8..8).prop_map(|(at, bit)| Edit::FlipBit { at, bit }),
        2 => (at.clone(), any::<u8>()).prop_map(|(at, byte)| Edit::SetByte { at, byte }),
        2 => (at.clone(), proptest::sample::select(vec![1u8, 2, 4, 8]), awkward())
            .prop_map(|(at, width, value)| Edit::PutInt { at, width, value }),
        3 => (any::<u32>(), awkward()).prop_map(|(f, value)| Edit::PutField {
            field: f as usize,
            value
        }),
        2 => (
            at.clone(),
            prop_oneof![
                proptest::sample::select(dict.to_vec()).prop_map(<[u8]>::to_vec),
                proptest::collection::vec(any::<u8>(), 1..12),
            ]
        )
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        1 => (at.clone(), 1usize..64).prop_map(|(at, n)| Edit::Delete { at, n }),
        1 => at.clone().prop_map(|at| Edit::Truncate { at }),
        1 => (at.clone(), 1usize..256, at).prop_map(|(from, n, to)| Edit::Splice { from, n, to }),
    ]
}

/// Applies `edits` to `bytes`; `fields` are the byte positions of the seed's length fields.
pub fn apply(bytes: &mut Vec<u8>, edits: &[Edit], fields: &[usize]) {
    for e in edits {
        let len = bytes.len();
        let pos = |at: usize| if len == 0 { 0 } else { at % len };
        match e {
            Edit::FlipBit { at, bit } if len > 0 => bytes[pos(*at)] ^= 1 << bit,
            Edit::SetByte { at, byte } if len > 0 => bytes[pos(*at)] = *byte,
            Edit::PutInt { at, width, value } => put(bytes, pos(*at), *width as usize, *value),
            Edit::PutField { field, value } => {
                let at = if fields.is_empty() {
                    0
                } else {
                    fields[field % fields.len()]
                };
                put(bytes, at, 8, *value)
            }
            Edit::Insert { at, bytes: b } => {
                let at = at % (len + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Delete { at, n } if len > 0 => {
                let at = pos(*at);
                bytes.drain(at..(at + n).min(len));
            }
            Edit::Truncate { at } => bytes.truncate(at % (len + 1)),
            Edit::Splice { from, n, to } if len > 0 => {
                let from = pos(*from);
                let chunk = bytes[from..(from + n).min(len)].to_vec();
                let to = to % (len + 1);
                bytes.splice(to..to, chunk);
            }
            _ => {}
        }
    }
}

/// Writes the low `width` bytes of `value`, little-endian, at `at` (clipped at the end).
fn put(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
        if let Some(slot) = bytes.get_mut(at + i) {
            *slot = *b;
        }
    }
}

/// What a JSON edit does to the node it picks.
#[derive(Debug, Clone)]
pub enum JsonOp {
    /// Replaced by one of [`json_values`].
    Replace(usize),
    /// Replaced by a copy of another node of the document (a value of the wrong type or size).
    Swap(usize),
    /// Removed from its object or array.
    Remove,
    /// A number or bool as a string, a string as a number.
    Retype,
    /// `x` becomes `[x]`.
    Wrap,
    /// An object gains a key copied from elsewhere in the document, or an array a copy of its
    /// first item.
    Grow(usize),
}

/// One JSON edit: the `node`-th node in pre-order (modulo their number) gets `op`.
#[derive(Debug, Clone)]
pub struct JsonEdit {
    pub node: usize,
    pub op: JsonOp,
}

/// Replacement values: every type, numbers past every integer range, empty and nested containers.
pub fn json_values() -> Vec<Value> {
    let deep = (0..200).fold(Value::Null, |v, _| Value::Array(vec![v]));
    vec![
        Value::Null,
        true.into(),
        false.into(),
        0.into(),
        (-1).into(),
        1.into(),
        0.5.into(),
        (-0.5).into(),
        1e308.into(),
        (-1e308).into(),
        5e-324.into(),
        u64::MAX.into(),
        i64::MIN.into(),
        (1u64 << 53).into(),
        (1u64 << 32).into(),
        (1u64 << 31).into(),
        (1u64 << 40).into(),
        4096.into(),
        "".into(),
        "nf4".into(),
        "float32".into(),
        "\u{0}\u{ffff}".into(),
        Value::Array(vec![]),
        serde_json::json!([1]),
        serde_json::json!([0, 18446744073709551615u64]),
        serde_json::json!([-1, 2]),
        serde_json::json!({}),
        serde_json::json!({"a": 1}),
        deep,
    ]
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let n = json_values().len();
    let op = prop_oneof![
        4 => (0..n).prop_map(JsonOp::Replace),
        2 => any::<u32>().prop_map(|i| JsonOp::Swap(i as usize)),
        2 => Just(JsonOp::Remove),
        1 => Just(JsonOp::Retype),
        1 => Just(JsonOp::Wrap),
        1 => any::<u32>().prop_map(|i| JsonOp::Grow(i as usize)),
    ];
    (any::<u32>(), op).prop_map(|(node, op)| JsonEdit {
        node: node as usize,
        op,
    })
}

/// A path step: object key or array index.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                here.push(Step::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(x, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// Applies `edits` to the document `v`.
pub fn apply_json(v: &mut Value, edits: &[JsonEdit]) {
    let values = json_values();
    for e in edits {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let path = all[e.node % all.len()].clone();
        let other = |i: usize| node_mut(&mut v.clone(), &all[i % all.len()]).clone();
        match &e.op {
            JsonOp::Replace(i) => *node_mut(v, &path) = values[*i].clone(),
            JsonOp::Swap(i) => {
                let x = other(*i);
                *node_mut(v, &path) = x;
            }
            JsonOp::Remove => {
                if let Some((last, parent)) = path.split_last() {
                    match (node_mut(v, parent), last) {
                        (Value::Object(m), Step::Key(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), Step::Index(i)) => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            JsonOp::Retype => {
                let node = node_mut(v, &path);
                *node = match node.take() {
                    Value::String(s) => s.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
                    Value::Null => "null".into(),
                    other => other.to_string().into(),
                };
            }
            JsonOp::Wrap => {
                let node = node_mut(v, &path);
                *node = Value::Array(vec![node.take()]);
            }
            JsonOp::Grow(i) => {
                let (key, x) = match all[i % all.len()].last() {
                    Some(Step::Key(k)) => (k.clone(), other(*i)),
                    _ => ("extra".to_string(), other(*i)),
                };
                match node_mut(v, &path) {
                    Value::Object(m) => {
                        m.insert(key, x);
                    }
                    Value::Array(a) => {
                        if let Some(first) = a.first().cloned() {
                            a.push(first);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}
