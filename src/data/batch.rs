//! Rows and micro-batches. Conversations are truncated to `max_seq_len` (counted), then either packed
//! best-fit decreasing into rows of at most `max_seq_len` tokens (positions restart per
//! conversation, each conversation its own segment, so nothing attends across them) or kept one per
//! row. A
//! micro-batch pads its rows to the longest with the pad id, untrained, in a segment of their own.

use super::tokenize::Encoded;
use crate::train::{Batch, grads::IGNORE_INDEX};
use candle_core::{Device, Tensor};

/// One training row: up to `max_seq_len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    /// `targets[t]`: the token position `t` predicts, or −100.
    pub targets: Vec<i64>,
    pub positions: Vec<u32>,
    /// 1-based segment per conversation in the row.
    pub segments: Vec<u32>,
}

/// What building rows did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowStats {
    pub conversations: usize,
    pub truncated: usize,
    /// Dropped because nothing trainable was left after truncation.
    pub dropped: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    /// Rows built, and the tokens they could hold (`rows × max_seq_len`).
    pub rows: usize,
    pub capacity: usize,
}

impl RowStats {
    /// The share of the rows' room left as padding.
    pub fn padding_fraction(&self) -> f64 {
        1.0 - self.tokens as f64 / self.capacity.max(1) as f64
    }
}

/// Builds rows from encoded conversations: each truncated to `max_seq_len` (counted) and dropped
/// when nothing trained is left; then one per row, or with `pack` packed best-fit decreasing (TRL's
/// `bfd` strategy): longest first, each into the row whose free space fits it most tightly, a new
/// row when none does.
pub fn build_rows(encoded: &[Encoded], max_seq_len: usize, pack: bool) -> (Vec<Row>, RowStats) {
    let mut stats = RowStats {
        conversations: encoded.len(),
        ..Default::default()
    };
    // (ids, targets) of each kept conversation, in order.
    let mut kept: Vec<(&[u32], Vec<i64>)> = Vec::new();
    for e in encoded {
        let n = e.ids.len().min(max_seq_len);
        if n < e.ids.len() {
            stats.truncated += 1;
        }
        let ids = &e.ids[..n];
        // Position t predicts token t + 1 when that token is trained.
        let targets: Vec<i64> = (0..n)
            .map(|t| {
                if t + 1 < n && e.trained[t + 1] {
                    ids[t + 1] as i64
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        let trained = targets.iter().filter(|t| **t != IGNORE_INDEX).count();
        if trained == 0 {
            stats.dropped += 1;
            continue;
        }
        stats.tokens += n;
        stats.trained_tokens += trained;
        kept.push((ids, targets));
    }
    // Row of each kept conversation.
    let bins: Vec<Vec<usize>> = if pack {
        let mut order: Vec<usize> = (0..kept.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(kept[i].0.len()));
        let mut bins: Vec<Vec<usize>> = Vec::new();
        // Free space → rows with that much free, for the tightest fit in log time.
        let mut free: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for i in order {
            let n = kept[i].0.len();
            let fit = free.range(n..).next().map(|(&space, _)| space);
            let b = match fit {
                Some(space) => {
                    let rows = free.get_mut(&space).expect("found above");
                    let b = rows.pop().expect("non-empty");
                    if rows.is_empty() {
                        free.remove(&space);
                    }
                    free.entry(space - n).or_default().push(b);
                    b
                }
                None => {
                    bins.push(Vec::new());
                    free.entry(max_seq_len - n)
                        .or_default()
                        .push(bins.len() - 1);
                    bins.len() - 1
                }
            };
            bins[b].push(i);
        }
        bins
    } else {
        (0..kept.len()).map(|i| vec![i]).collect()
    };
    let rows = bins
        .iter()
        .map(|members| {
            let mut row = Row {
                ids: Vec::new(),
                targets: Vec::new(),
                positions: Vec::new(),
                segments: Vec::new(),
            };
            for (k, &i) in members.iter().enumerate() {
                let (ids, targets) = &kept[i];
                row.ids.extend_from_slice(ids);
                row.targets.extend_from_slice(targets);
                row.positions.extend(0..ids.len() as u32);
                row.segments
                    .extend(std::iter::repeat_n(k as u32 + 1, ids.len()));
            }
            row
        })
        .collect::<Vec<_>>();
    stats.rows = rows.len();
    stats.capacity = rows.len() * max_seq_len;
    (rows, stats)
}

/// A micro-batch from rows, padded to the longest with `pad_id`.
pub fn collate(rows: &[&Row], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut pos, mut seg, mut targets) = (
        Vec::with_capacity(b * t),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for r in rows {
        let pad = t - r.ids.len();
        ids.extend(
            r.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        pos.extend(r.positions.iter().copied().chain(0..pad as u32));
        seg.extend(
            r.segments
                .iter()
                .copied()
                .chain(std::iter::repeat_n(u32::MAX, pad)),
        );
        targets.extend(
            r.targets
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, pad)),
        );
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(pos, (b, t), device)?,
        segments: Some(Tensor::from_vec(seg, (b, t), device)?),
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[u32], trained: &[bool]) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            trained: trained.to_vec(),
            text: String::new(),
            line: 1,
        }
    }

    #[test]
    fn packing_restarts_positions_and_never_predicts_across_conversations() {
        let a = enc(&[1, 2, 3, 4], &[false, false, true, true]);
        let b = enc(&[5, 6, 7], &[false, true, true]);
        let (rows, stats) = build_rows(&[a.clone(), b.clone()], 8, true);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.ids, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(r.positions, vec![0, 1, 2, 3, 0, 1, 2]);
        assert_eq!(r.segments, vec![1, 1, 1, 1, 2, 2, 2]);
        // 2 → 3, 3 → 4 trained; 4 → 5 crosses conversations: ignored.
        assert_eq!(r.targets, vec![-100, 3, 4, -100, 6, 7, -100]);
        assert_eq!(stats.trained_tokens, 4);
        let (rows, _) = build_rows(&[a.clone(), b], 8, false);
        assert_eq!(rows.len(), 2);
        let (rows, stats) = build_rows(&[a], 2, true);
        assert_eq!((rows.len(), stats.truncated, stats.dropped), (0, 1, 1));
    }

    #[test]
    fn packing_is_best_fit_decreasing() {
        // Rows of 10: 6 opens a row (4 free), 5 another (5 free); 4 goes where it fits most
        // tightly (the 4 free, not the 5), 3 into the other. In order, 6 | 5 4 | 3 would take 3
        // rows.
        let conv = |n: usize, first: u32| {
            let ids: Vec<u32> = (first..first + n as u32).collect();
            enc(&ids, &vec![true; n])
        };
        let e = [conv(5, 10), conv(3, 20), conv(6, 30), conv(4, 40)];
        let (rows, stats) = build_rows(&e, 10, true);
        let starts: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                r.positions
                    .iter()
                    .zip(&r.ids)
                    .filter(|(p, _)| **p == 0)
                    .map(|(_, id)| *id)
                    .collect()
            })
            .collect();
        assert_eq!(starts, vec![vec![30, 40], vec![10, 20]]);
        assert_eq!((stats.rows, stats.capacity, stats.tokens), (2, 20, 18));
        assert!((stats.padding_fraction() - 0.1).abs() < 1e-12);
    }
}
