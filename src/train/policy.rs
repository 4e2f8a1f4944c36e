//! Gradient checkpointing per block: what each block keeps from its forward for the backward, the
//! setting users write (`training.gradient_checkpointing`) and the per-block choice a step runs.
//!
//! Three policies, from the most memory to the least ([`BlockPolicy`]): keep every activation;
//! keep the block input plus the outputs of its expensive ops (the attention's and the gate/up
//! projection's) and recompute the rest; keep only the block input and recompute the whole block.
//! Every policy gives the same gradients: the recomputed forward runs the same ops on the same
//! values, and a kept output is handed back to its op, whose own backward then runs
//! (`model::phi3::Tap`). `"auto"` lets `qlora plan` pick the policies with the fewest recomputed
//! FLOPs whose predicted peak fits the budget (`plan::policy`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What one block keeps from its forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockPolicy {
    /// Every activation: nothing is recomputed.
    Keep,
    /// The block input, the attention's output and the gate/up projection's output (where their
    /// ops can take them back): the backward recomputes the norms, the q/k/v, output and down
    /// projections and the SwiGLU, not the attention or the gate/up product.
    Selective,
    /// Only the block input: the backward recomputes the whole block.
    Recompute,
}

impl BlockPolicy {
    /// Short names for people (`qlora plan`, the train line).
    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep all",
            Self::Selective => "keep attention + gate/up",
            Self::Recompute => "input only",
        }
    }
}

/// The policy of every block of a step, block 0 first (or one for all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpointing {
    Uniform(BlockPolicy),
    Blocks(Vec<BlockPolicy>),
}

impl From<bool> for Checkpointing {
    /// `true`: every block recomputed from its input; `false`: every activation kept.
    fn from(on: bool) -> Self {
        Self::Uniform(if on {
            BlockPolicy::Recompute
        } else {
            BlockPolicy::Keep
        })
    }
}

impl From<BlockPolicy> for Checkpointing {
    fn from(p: BlockPolicy) -> Self {
        Self::Uniform(p)
    }
}

impl From<&Checkpointing> for Checkpointing {
    fn from(c: &Checkpointing) -> Self {
        c.clone()
    }
}

impl Checkpointing {
    /// Block `layer`'s policy (the last one's past the end of a list).
    pub fn of(&self, layer: usize) -> BlockPolicy {
        match self {
            Self::Uniform(p) => *p,
            Self::Blocks(v) => v
                .get(layer)
                .or(v.last())
                .copied()
                .unwrap_or(BlockPolicy::Recompute),
        }
    }

    /// Whether every one of `layers` blocks keeps everything (one graph over the whole step).
    pub fn keeps_all(&self, layers: usize) -> bool {
        (0..layers).all(|l| self.of(l) == BlockPolicy::Keep)
    }

    /// Whether any of `layers` blocks recomputes something.
    pub fn recomputes(&self, layers: usize) -> bool {
        !self.keeps_all(layers)
    }

    /// The policies as runs of blocks, for people: `blocks 0–19 input only, 20–31 keep all`.
    pub fn describe(&self, layers: usize) -> String {
        let mut runs: Vec<(usize, usize, BlockPolicy)> = Vec::new();
        for l in 0..layers {
            let p = self.of(l);
            match runs.last_mut() {
                Some((_, end, q)) if *q == p => *end = l,
                _ => runs.push((l, l, p)),
            }
        }
        if let [(_, _, p)] = runs.as_slice() {
            return format!("every block {}", p.name());
        }
        runs.iter()
            .map(|&(a, b, p)| {
                if a == b {
                    format!("block {a} {}", p.name())
                } else {
                    format!("blocks {a}–{b} {}", p.name())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `training.gradient_checkpointing`: `"auto"` (the default), `true`, `false` or `"selective"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Setting {
    /// Per block, the policies with the fewest recomputed FLOPs whose predicted peak fits the
    /// budget (`--budget`, else the device's free memory less a margin).
    #[default]
    Auto,
    /// Every block from its input (`true`).
    On,
    /// Nothing recomputed (`false`).
    Off,
    /// Every block keeps its attention and gate/up outputs (`"selective"`).
    Selective,
}

impl Setting {
    /// The policies this setting fixes by itself (`None` for `Auto`, which needs a plan).
    pub fn fixed(self) -> Option<Checkpointing> {
        match self {
            Self::Auto => None,
            Self::On => Some(BlockPolicy::Recompute.into()),
            Self::Off => Some(BlockPolicy::Keep.into()),
            Self::Selective => Some(BlockPolicy::Selective.into()),
        }
    }
}

impl std::str::FromStr for Setting {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "true" | "on" => Ok(Self::On),
            "false" | "off" => Ok(Self::Off),
            "selective" => Ok(Self::Selective),
            other => anyhow::bail!(
                "`{other}` is not a gradient checkpointing setting; use \"auto\", true, false or \"selective\""
            ),
        }
    }
}

impl Serialize for Setting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::On => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
            Self::Auto => s.serialize_str("auto"),
            Self::Selective => s.serialize_str("selective"),
        }
    }
}

impl<'de> Deserialize<'de> for Setting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "want \"auto\", true, false or \"selective\" (a string or a boolean)",
            )
        })? {
            Raw::Bool(b) => Ok(if b { Self::On } else { Self::Off }),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_and_write_as_users_write_them() {
        #[derive(Deserialize, Serialize)]
        struct T {
            g: Setting,
        }
        for (text, want) in [
            ("g = true", Setting::On),
            ("g = false", Setting::Off),
            ("g = \"auto\"", Setting::Auto),
            ("g = \"selective\"", Setting::Selective),
        ] {
            let t: T = toml::from_str(text).unwrap();
            assert_eq!(t.g, want, "{text}");
            assert_eq!(toml::to_string(&t).unwrap().trim(), text);
        }
        let e = toml::from_str::<T>("g = \"sometimes\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"auto\", true, false or \"selective\""), "{e}");
        assert!(toml::from_str::<T>("g = 3").is_err());
    }

    #[test]
    fn runs_of_blocks_are_described_once_each() {
        use BlockPolicy::*;
        let c = Checkpointing::Blocks(vec![Recompute, Recompute, Selective, Keep, Keep]);
        assert_eq!(
            c.describe(5),
            "blocks 0–1 input only, block 2 keep attention + gate/up, blocks 3–4 keep all"
        );
        assert_eq!(
            Checkpointing::from(true).describe(4),
            "every block input only"
        );
        assert!(Checkpointing::from(false).keeps_all(4));
        assert!(!c.keeps_all(5) && c.recomputes(5));
        assert_eq!(c.of(2), Selective);
    }
}
