//! Seed files built here where the repository has no real one: a GGUF with every metadata value
//! type and a small SentencePiece model, each with the byte positions of its length fields (the
//! mutations overwrite those with huge values).

/// A GGUF v3 with every metadata value type, an array of each kind and three tensors (f32, q8_0,
/// q4_k), and the byte positions of its length, count, dimension and offset fields.
pub fn gguf_seed() -> (Vec<u8>, Vec<usize>) {
    let mut b: Vec<u8> = b"GGUF".to_vec();
    let mut fields = Vec::new();
    let u32 = |b: &mut Vec<u8>, x: u32| b.extend_from_slice(&x.to_le_bytes());
    let u64f = |b: &mut Vec<u8>, f: &mut Vec<usize>, x: u64| {
        f.push(b.len());
        b.extend_from_slice(&x.to_le_bytes());
    };
    let string = |b: &mut Vec<u8>, f: &mut Vec<usize>, s: &str| {
        f.push(b.len());
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    u32(&mut b, 3);
    u64f(&mut b, &mut fields, 3); // tensors
    u64f(&mut b, &mut fields, 16); // metadata pairs
    let scalars: [(&str, u32, Vec<u8>); 12] = [
        ("k.u8", 0, vec![7]),
        ("k.i8", 1, vec![0xfd]),
        ("k.u16", 2, 513u16.to_le_bytes().to_vec()),
        ("k.i16", 3, (-2i16).to_le_bytes().to_vec()),
        ("general.alignment", 4, 32u32.to_le_bytes().to_vec()),
        ("k.i32", 5, (-70000i32).to_le_bytes().to_vec()),
        ("k.f32", 6, 0.25f32.to_le_bytes().to_vec()),
        ("k.bool", 7, vec![1]),
        ("k.u64", 10, (1u64 << 40).to_le_bytes().to_vec()),
        ("k.i64", 11, (-5i64).to_le_bytes().to_vec()),
        ("k.f64", 12, 1e-3f64.to_le_bytes().to_vec()),
        ("general.architecture", 8, {
            let mut v = 4u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"phi3");
            v
        }),
    ];
    for (k, ty, v) in scalars {
        string(&mut b, &mut fields, k);
        u32(&mut b, ty);
        if ty == 8 {
            fields.push(b.len());
        }
        b.extend_from_slice(&v);
    }
    string(&mut b, &mut fields, "tokenizer.ggml.tokens");
    u32(&mut b, 9);
    u32(&mut b, 8);
    u64f(&mut b, &mut fields, 3);
    for s in ["<s>", "▁a", ""] {
        string(&mut b, &mut fields, s);
    }
    string(&mut b, &mut fields, "tokenizer.ggml.scores");
    u32(&mut b, 9);
    u32(&mut b, 6);
    u64f(&mut b, &mut fields, 2);
    b.extend_from_slice(&[0u8; 8]);
    string(&mut b, &mut fields, "k.arr_u8");
    u32(&mut b, 9);
    u32(&mut b, 0);
    u64f(&mut b, &mut fields, 3);
    b.extend_from_slice(&[1, 2, 3]);
    string(&mut b, &mut fields, "k.arr_i64");
    u32(&mut b, 9);
    u32(&mut b, 11);
    u64f(&mut b, &mut fields, 1);
    b.extend_from_slice(&(-1i64).to_le_bytes());
    // Tensors: f32 [2, 4] (32 bytes), q8_0 [1, 32] (34), q4_k [256] (144), 32-aligned.
    for (name, ne, ty, offset) in [
        ("a.weight", vec![4u64, 2], 0u32, 0u64),
        ("b.weight", vec![32, 1], 8, 32),
        ("c.weight", vec![256], 12, 96),
    ] {
        string(&mut b, &mut fields, name);
        u32(&mut b, ne.len() as u32);
        for d in ne {
            u64f(&mut b, &mut fields, d);
        }
        u32(&mut b, ty);
        u64f(&mut b, &mut fields, offset);
    }
    b.resize(b.len().next_multiple_of(32), 0);
    b.extend((0..240u32).map(|i| (i * 7 % 256) as u8));
    (b, fields)
}

/// A protobuf varint.
fn varint(b: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        b.push((x as u8) | 0x80);
        x >>= 7;
    }
    b.push(x as u8);
}

/// A small SentencePiece ModelProto (unknown, control, byte and normal pieces, a trainer spec and
/// a normalizer spec), and the positions of its length varints.
pub fn sentencepiece_seed() -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut message = |out: &mut Vec<u8>, field: u64, body: &[u8]| {
        varint(out, field << 3 | 2);
        fields.push(out.len());
        varint(out, body.len() as u64);
        out.extend_from_slice(body);
    };
    let mut pieces: Vec<(String, f32, u64)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    pieces.extend((0..4).map(|i| (format!("<0x{i:02X}>"), 0.0, 6)));
    pieces.extend(
        ["▁t", "he", "▁the", "▁a", "in", "▁in", "é", "日本"]
            .iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), -(i as f32), 1)),
    );
    for (piece, score, ty) in pieces {
        let mut body = Vec::new();
        body.push(1 << 3 | 2);
        varint(&mut body, piece.len() as u64);
        body.extend_from_slice(piece.as_bytes());
        body.push(2 << 3 | 5);
        body.extend_from_slice(&score.to_le_bytes());
        if ty != 1 {
            body.push(3 << 3);
            varint(&mut body, ty);
        }
        message(&mut out, 1, &body);
    }
    // trainer_spec: model_type BPE (3), vocab_size 15, byte_fallback true, a 64-bit field.
    let mut trainer = vec![3 << 3, 2, 4 << 3, 15, 35 << 3, 1];
    varint(&mut trainer, 40 << 3 | 1);
    trainer.extend_from_slice(&1.5f64.to_le_bytes());
    message(&mut out, 2, &trainer);
    let mut normalizer = vec![1 << 3 | 2, 8];
    normalizer.extend_from_slice(b"identity");
    message(&mut out, 3, &normalizer);
    (out, fields)
}
