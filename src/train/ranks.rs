//! The data-parallel plumbing of the loop ([`crate::dist`] below it): which units of a global
//! micro-batch are this rank's, the step's all-reduce of gradients and scalars (a stop request
//! riding along), the checks that every rank trains the same thing, and how a checkpoint resumes on
//! another world size.
//!
//! A micro-batch is a *global* one of `world × micro_batch_size` units (the same units in any
//! world size), rank `r` taking its units `r, r + world, …`; each rank sums its gradients and
//! scalars, the sums are all-reduced, and everything after (normalising, clipping, AdamW, the
//! schedule) runs identically on every rank. Dropout masks are numbered by global row.

use super::stop::Stop;
use super::trainer::TrainState;
use crate::dist::{self, Communicator};
use anyhow::{Result, bail};
use candle_core::{DType, Tensor, Var};

/// This rank's units of a global micro-batch: `rank, rank + world, …`.
pub fn share(global: &[usize], rank: usize, world: usize) -> Vec<usize> {
    global.iter().skip(rank).step_by(world).copied().collect()
}

/// Sums a step's gradients and scalars (with its input-token count and `stop`'s vote) over the
/// ranks; a single process returns them as they are.
pub fn reduce_step(
    comm: &dyn Communicator,
    sums: Vec<Tensor>,
    scalars: &mut [f64],
    n_input: &mut usize,
    stop: &Stop,
) -> Result<Vec<Tensor>> {
    if comm.is_single() {
        return Ok(sums);
    }
    let flat = comm.all_reduce_sum(&dist::flatten(&sums)?)?;
    let sums = dist::unflatten(&flat, &sums)?;
    // A rank's stop request rides along: every rank learns it after the same step.
    let mut v = scalars.to_vec();
    v.extend([*n_input as f64, stop.vote()]);
    comm.all_reduce_scalars(&mut v)?;
    let k = scalars.len();
    scalars.copy_from_slice(&v[..k]);
    *n_input = v[k] as usize;
    stop.agree(v[k + 1]);
    Ok(sums)
}

/// Every rank must train the same thing: the config, the data (its fingerprint) and the initial
/// trainable values.
pub fn check_same_run(
    comm: &dyn Communicator,
    config: &str,
    data: Vec<u8>,
    params: &[Var],
) -> Result<()> {
    if comm.is_single() {
        return Ok(());
    }
    dist::check_same(
        comm,
        "config",
        dist::fnv1a(config.as_bytes().iter().copied()),
    )?;
    dist::check_same(comm, "training data", dist::fnv1a(data))?;
    let mut bytes = Vec::new();
    for p in params {
        let v: Vec<f32> = p
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    dist::check_same(comm, "initial adapter", dist::fnv1a(bytes))
}

/// Each rank's micro-batch when a checkpoint is resumed on `world` ranks: the checkpoint's global
/// micro-batch split evenly (a checkpoint from before data parallelism keeps `micro_batch_size`).
pub fn rank_micro_batch(
    state: &TrainState,
    micro_batch_size: usize,
    world: usize,
) -> Result<usize> {
    let global = state.global_micro_batch;
    if global == 0 || global == world * micro_batch_size {
        return Ok(micro_batch_size);
    }
    if !global.is_multiple_of(world) {
        bail!(
            "the checkpoint's global micro-batch is {global} rows, which {world} ranks cannot split evenly; resume with a world size that divides {global}"
        );
    }
    Ok(global / world)
}

/// The cursor of a resumed run in global micro-batches of `global` rows: a checkpoint counts in
/// its own run's (`state.global_micro_batch`, or `micro_batch_size` for a checkpoint from before
/// data parallelism). A different world size keeps the data position when the rows consumed in the
/// epoch fill whole new micro-batches (the same loss curve needs the same global batch:
/// `world × batch size`).
pub fn resume_cursor(state: &TrainState, micro_batch_size: usize, global: usize) -> Result<usize> {
    let saved = if state.global_micro_batch == 0 {
        micro_batch_size
    } else {
        state.global_micro_batch
    };
    let rows = state.cursor * saved;
    if !rows.is_multiple_of(global) {
        bail!(
            "the checkpoint stands {rows} rows into epoch {}, which is not a whole number of global micro-batches of {global} rows (world size × batch size); resume with a world size × batch size that divides it (the checkpoint's was {saved})",
            state.epoch
        );
    }
    Ok(rows / global)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cursor: usize, global_micro_batch: usize) -> TrainState {
        TrainState {
            cursor,
            global_micro_batch,
            ..Default::default()
        }
    }

    #[test]
    fn a_resumed_world_splits_the_checkpoints_global_micro_batch() {
        // 2 ranks × 1 resumed on 1 process: batch 2; on 2 again: 1.
        assert_eq!(rank_micro_batch(&state(3, 2), 1, 1).unwrap(), 2);
        assert_eq!(rank_micro_batch(&state(3, 2), 1, 2).unwrap(), 1);
        // 1 × 4 on 4 ranks: 1 each.
        assert_eq!(rank_micro_batch(&state(3, 4), 4, 4).unwrap(), 1);
        // A checkpoint from before data parallelism keeps the configured batch.
        assert_eq!(rank_micro_batch(&state(3, 0), 3, 2).unwrap(), 3);
        // 3 rows cannot be split over 2 ranks.
        let err = rank_micro_batch(&state(3, 3), 3, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot split evenly"), "{err}");
    }

    #[test]
    fn the_cursor_keeps_the_rows_consumed() {
        assert_eq!(resume_cursor(&state(3, 2), 1, 2).unwrap(), 3);
        // An old checkpoint (no global batch recorded) counted in micro_batch_size rows.
        assert_eq!(resume_cursor(&state(3, 0), 2, 1).unwrap(), 6);
        assert_eq!(resume_cursor(&state(3, 0), 2, 2).unwrap(), 3);
        assert!(resume_cursor(&state(3, 0), 1, 2).is_err());
    }
}
