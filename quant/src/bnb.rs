//! The bitsandbytes-4bit checkpoint layout, as transformers saves it (`QuantState.as_dict(packed=True)`)
//! and loads it (`QuantState.from_dict`). For a linear weight `P.weight`:
//!
//! | tensor                                      | dtype / shape                                  |
//! |---------------------------------------------|------------------------------------------------|
//! | `P.weight`                                  | u8 `[(n+1)/2, 1]` (or the same bytes as bf16/f16/f32 `[bytes/size, 1]` under `bnb_4bit_quant_storage`) |
//! | `P.weight.absmax`                           | f32 `[n_blocks]`, or u8 codes when double-quantized |
//! | `P.weight.quant_map`                        | f32 `[16]`                                     |
//! | `P.weight.nested_absmax`                    | f32 `[ceil(n_blocks/256)]` (double quant only) |
//! | `P.weight.nested_quant_map`                 | f32 `[256]` (double quant only)                |
//! | `P.weight.quant_state.bitsandbytes__nf4`    | u8: JSON `{quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset}` |
//!
//! and `config.json` carries a `quantization_config` ([`QuantizationConfig`]).

use crate::format::{Blocksize, NESTED_BLOCK_ELEMS, QuantType, dynamic_map};
use crate::nested::NestedAbsmax;
use crate::quantized::{Absmax, Quantized};
use crate::{QuantError, Result};
use candle_core::DType;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Suffixes of the quant-state tensors stored beside `P.weight`.
pub const STATE_SUFFIXES: [&str; 6] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
];

/// Whether `name` is a quant-state companion of some `*.weight` (not a weight itself).
pub fn is_state_tensor(name: &str) -> bool {
    STATE_SUFFIXES
        .iter()
        .any(|s| name.ends_with(&format!(".weight{s}")))
}

/// The dtype that holds the packed bytes (`bnb_4bit_quant_storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantStorage {
    #[default]
    Uint8,
    Bfloat16,
    Float16,
    Float32,
}

impl QuantStorage {
    fn dtype(self) -> Dtype {
        match self {
            Self::Uint8 => Dtype::U8,
            Self::Bfloat16 => Dtype::BF16,
            Self::Float16 => Dtype::F16,
            Self::Float32 => Dtype::F32,
        }
    }
}

/// The JSON stored in `P.weight.quant_state.bitsandbytes__<type>` (bitsandbytes' key order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedQuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f64>,
}

/// `config.json`'s `quantization_config` as transformers writes it for 4-bit bitsandbytes.
/// Reading ignores keys we don't interpret (transformers' own format, it grows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub load_in_4bit: bool,
    #[serde(default)]
    pub load_in_8bit: bool,
    #[serde(rename = "_load_in_4bit", default)]
    pub load_in_4bit_private: bool,
    #[serde(rename = "_load_in_8bit", default)]
    pub load_in_8bit_private: bool,
    pub bnb_4bit_quant_type: QuantType,
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    #[serde(default = "default_compute_dtype")]
    pub bnb_4bit_compute_dtype: String,
    #[serde(default)]
    pub bnb_4bit_quant_storage: QuantStorage,
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    #[serde(default = "default_threshold")]
    pub llm_int8_threshold: f64,
    #[serde(default)]
    pub llm_int8_enable_fp32_cpu_offload: bool,
    #[serde(default)]
    pub llm_int8_has_fp16_weight: bool,
}

fn default_compute_dtype() -> String {
    "float32".into()
}
fn default_threshold() -> f64 {
    6.0
}

impl QuantizationConfig {
    /// The 4-bit config for our quantizer's choices.
    pub fn new_4bit(quant_type: QuantType, double_quant: bool, compute_dtype: DType) -> Self {
        Self {
            quant_method: "bitsandbytes".into(),
            load_in_4bit: true,
            load_in_8bit: false,
            load_in_4bit_private: true,
            load_in_8bit_private: false,
            bnb_4bit_quant_type: quant_type,
            bnb_4bit_use_double_quant: double_quant,
            bnb_4bit_compute_dtype: torch_dtype_name(compute_dtype).into(),
            bnb_4bit_quant_storage: QuantStorage::Uint8,
            llm_int8_skip_modules: None,
            llm_int8_threshold: 6.0,
            llm_int8_enable_fp32_cpu_offload: false,
            llm_int8_has_fp16_weight: false,
        }
    }

    /// Whether this describes a 4-bit bitsandbytes checkpoint.
    pub fn is_bnb_4bit(&self) -> bool {
        self.quant_method == "bitsandbytes" && (self.load_in_4bit || self.load_in_4bit_private)
    }
}

/// torch's dtype name (`str(dtype)` without `torch.`).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        _ => "unknown",
    }
}

fn dtype_from_torch_name(name: &str) -> Option<DType> {
    match name {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// An owned tensor ready for `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn f32(values: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    pub fn u8(values: &[u8]) -> Self {
        Self {
            dtype: Dtype::U8,
            shape: vec![values.len()],
            data: values.to_vec(),
        }
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The tensors bitsandbytes stores for the quantized weight named `weight_name` (e.g.
/// `model.layers.0.self_attn.qkv_proj.weight`).
pub fn to_tensors(
    weight_name: &str,
    q: &Quantized,
    storage: QuantStorage,
) -> Result<Vec<(String, RawTensor)>> {
    q.validate()?;
    let size = storage.dtype().bitsize() / 8;
    if !q.packed.len().is_multiple_of(size) {
        return Err(bnb_err(
            weight_name,
            format!(
                "{} packed bytes cannot be stored as {storage:?}; use uint8 storage",
                q.packed.len()
            ),
        ));
    }
    let weight = RawTensor {
        dtype: storage.dtype(),
        shape: vec![q.packed.len() / size, 1],
        data: q.packed.clone(),
    };
    let mut out = vec![(weight_name.to_string(), weight)];
    let mut state = PackedQuantState {
        quant_type: q.quant_type,
        blocksize: q.blocksize.elems(),
        dtype: torch_dtype_name(q.dtype).into(),
        shape: q.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    match &q.absmax {
        Absmax::Plain(a) => out.push((format!("{weight_name}.absmax"), RawTensor::f32(a))),
        Absmax::Nested(n) => {
            out.push((format!("{weight_name}.absmax"), RawTensor::u8(&n.codes)));
            out.push((
                format!("{weight_name}.nested_absmax"),
                RawTensor::f32(&n.nested_absmax),
            ));
            out.push((
                format!("{weight_name}.nested_quant_map"),
                RawTensor::f32(dynamic_map()),
            ));
            state.nested_blocksize = Some(NESTED_BLOCK_ELEMS);
            state.nested_dtype = Some("float32".into());
            state.nested_offset = Some(n.offset as f64);
        }
    }
    out.push((
        format!("{weight_name}.quant_map"),
        RawTensor::f32(&q.quant_type.stored_quant_map()),
    ));
    let json = python_json(&state);
    out.push((
        format!("{weight_name}.quant_state.bitsandbytes__{}", q.quant_type),
        RawTensor::u8(&json),
    ));
    Ok(out)
}

/// The quant state of the weight `weight_name` (its JSON tensor only, not the packed bytes): enough
/// for the weight's shape and dtype without reading its data. Returns the state tensor's name too.
pub fn quant_state<'a>(
    weight_name: &str,
    get: impl Fn(&str) -> Option<TensorView<'a>>,
) -> Result<(String, PackedQuantState)> {
    let (state_name, state_view) = ["nf4", "fp4"]
        .iter()
        .find_map(|t| {
            let name = format!("{weight_name}.quant_state.bitsandbytes__{t}");
            get(&name).map(|v| (name, v))
        })
        .ok_or_else(|| {
            bnb_err(
                weight_name,
                "no quant_state.bitsandbytes__nf4/__fp4 tensor beside it".into(),
            )
        })?;
    let state: PackedQuantState = serde_json::from_slice(state_view.data())
        .map_err(|e| bnb_err(&state_name, format!("invalid quant state JSON: {e}")))?;
    Ok((state_name, state))
}

/// Reads the quantized weight `weight_name`; `get` finds a tensor by name in the checkpoint
/// (any shard). Errors name the tensor and say what is wrong.
pub fn from_tensors<'a>(
    weight_name: &str,
    get: impl Fn(&str) -> Option<TensorView<'a>>,
) -> Result<Quantized> {
    let need = |suffix: &str| {
        let name = format!("{weight_name}{suffix}");
        get(&name).ok_or_else(|| bnb_err(&name, "missing from the checkpoint".into()))
    };
    let (state_name, state) = quant_state(weight_name, &get)?;
    let blocksize =
        Blocksize::new(state.blocksize).map_err(|e| bnb_err(&state_name, e.to_string()))?;
    let dtype = dtype_from_torch_name(&state.dtype)
        .ok_or_else(|| bnb_err(&state_name, format!("unsupported dtype `{}`", state.dtype)))?;

    let weight = need("")?;
    if !matches!(
        weight.dtype(),
        Dtype::U8 | Dtype::BF16 | Dtype::F16 | Dtype::F32
    ) {
        return Err(bnb_err(
            weight_name,
            format!("packed weight stored as {:?}", weight.dtype()),
        ));
    }
    // Whatever the storage dtype, the bytes are the packed codes.
    let packed = weight.data().to_vec();

    let quant_map = f32_values(&format!("{weight_name}.quant_map"), &need(".quant_map")?)?;
    if quant_map.as_slice() != state.quant_type.code() {
        // IEEE ==: ±0 agree
        return Err(bnb_err(
            &format!("{weight_name}.quant_map"),
            format!(
                "differs from bitsandbytes' {} table; custom code tables are not supported",
                state.quant_type
            ),
        ));
    }
    let absmax_view = need(".absmax")?;
    let absmax = match state.nested_offset {
        None => Absmax::Plain(f32_values(&format!("{weight_name}.absmax"), &absmax_view)?),
        Some(offset) => {
            if !(offset as f32).is_finite() {
                return Err(bnb_err(
                    &state_name,
                    format!("nested_offset {offset} is not a finite float32"),
                ));
            }
            if absmax_view.dtype() != Dtype::U8 {
                return Err(bnb_err(
                    &format!("{weight_name}.absmax"),
                    "nested absmax codes must be uint8".into(),
                ));
            }
            if state.nested_blocksize != Some(NESTED_BLOCK_ELEMS) {
                return Err(bnb_err(
                    &state_name,
                    format!(
                        "nested_blocksize {:?} (only 256 exists)",
                        state.nested_blocksize
                    ),
                ));
            }
            let map_name = format!("{weight_name}.nested_quant_map");
            if f32_values(&map_name, &need(".nested_quant_map")?)?.as_slice() != dynamic_map() {
                return Err(bnb_err(
                    &map_name,
                    "differs from bitsandbytes' signed 8-bit dynamic map".into(),
                ));
            }
            Absmax::Nested(NestedAbsmax {
                codes: absmax_view.data().to_vec(),
                nested_absmax: f32_values(
                    &format!("{weight_name}.nested_absmax"),
                    &need(".nested_absmax")?,
                )?,
                offset: offset as f32,
            })
        }
    };
    let q = Quantized {
        quant_type: state.quant_type,
        blocksize,
        shape: state.shape,
        dtype,
        packed,
        absmax,
    };
    q.validate()
        .map_err(|e| bnb_err(weight_name, e.to_string()))?;
    Ok(q)
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators, floats as `repr`), so
/// that the quant-state bytes equal what bitsandbytes' `pack_dict_to_tensor` stores.
fn python_json(value: &impl Serialize) -> Vec<u8> {
    struct PyFormatter;
    impl serde_json::ser::Formatter for PyFormatter {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
        fn write_f64<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            v: f64,
        ) -> std::io::Result<()> {
            w.write_all(python_float_repr(v).as_bytes())
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    value.serialize(&mut ser).expect("quant state serializes");
    out
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for exponents -4..16,
/// else `d.ddde±XX`.
fn python_float_repr(v: f64) -> String {
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let fixed = format!("{v}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    }
}

fn f32_values(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    if view.dtype() != Dtype::F32 {
        return Err(bnb_err(
            name,
            format!("expected float32, found {:?}", view.dtype()),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn bnb_err(name: &str, msg: String) -> QuantError {
    QuantError::Bnb {
        name: name.to_string(),
        msg,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_float_repr_matches_python() {
        for (v, py) in [
            (0.05052757263183594, "0.05052757263183594"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (2.5, "2.5"),
        ] {
            assert_eq!(super::python_float_repr(v), py);
        }
    }
}
