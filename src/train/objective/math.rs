//! The preference losses of one pair from its sequence scores, and their derivatives: TRL's
//! formulas (TRL 1.16: `DPOTrainer` sigmoid and ipo, the experimental `ORPOTrainer`, `CPOTrainer`
//! with `loss_type = "simpo"`, `cpo_alpha = 0`), in f64.

use serde::{Deserialize, Serialize};

/// What a run optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Supervised fine-tuning: cross-entropy on the assistant tokens.
    #[default]
    Sft,
    /// DPO (TRL `loss_type = "sigmoid"`): `−log σ(β·((π_c − π_r) − (ref_c − ref_r)))`.
    Dpo,
    /// IPO, TRL's length-normalised form: `((π_c − ref_c)/n_c − (π_r − ref_r)/n_r − 1/(2β))²`.
    Ipo,
    /// ORPO: the chosen sequences' NLL `− β · mean log σ(log-odds)` of the averaged log-probs.
    Orpo,
    /// SimPO: `−log σ(β(avg_c − avg_r) − γ)`.
    Simpo,
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "sft" => Self::Sft,
            "dpo" => Self::Dpo,
            "ipo" => Self::Ipo,
            "orpo" => Self::Orpo,
            "simpo" => Self::Simpo,
            other => anyhow::bail!("unknown objective `{other}`: use sft, dpo, ipo, orpo or simpo"),
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sft => "sft",
            Self::Dpo => "dpo",
            Self::Ipo => "ipo",
            Self::Orpo => "orpo",
            Self::Simpo => "simpo",
        })
    }
}

impl Kind {
    /// Whether the objective compares with a reference model.
    pub fn has_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::Ipo)
    }

    /// Whether a sequence's score is its mean log-prob (ORPO, SimPO) rather than the sum.
    pub fn averages(self) -> bool {
        matches!(self, Self::Orpo | Self::Simpo)
    }

    /// Whether the chosen sequences' NLL over every token (the prompt's too, as TRL's ORPO
    /// takes it) is part of the loss.
    pub fn chosen_nll(self) -> bool {
        self == Self::Orpo
    }
}

/// The objective's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// β (ORPO's λ, as TRL names it `beta` too).
    pub beta: f64,
    /// SimPO's target margin γ.
    pub gamma: f64,
}

/// One pair's inputs: summed log-probs of the scored completion tokens, their counts, and the
/// reference's sums (0 without a reference).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairScores {
    pub chosen: f64,
    pub rejected: f64,
    /// Scored completion tokens (positions predicting a completion token).
    pub n_chosen: usize,
    pub n_rejected: usize,
    /// Completion tokens (TRL's `completion_mask.sum()`, IPO's normaliser).
    pub len_chosen: usize,
    pub len_rejected: usize,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// One pair's loss, its derivatives by the summed log-probs, and what TRL logs of it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    /// `∂loss/∂Σ log p` over the chosen, and the rejected, completion.
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// `logps/chosen|rejected`: the sums (DPO, IPO) or the means (ORPO, SimPO).
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// ORPO: `log σ(log-odds)` and the log-odds.
    pub ratio: f64,
    pub log_odds: f64,
}

/// `log σ(x)`, stable for either sign.
pub fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `σ(x)`, stable for either sign.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 − eˣ)` for `x < 0`, as TRL's `log1mexp`.
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// The loss of one pair (before the mean over pairs) and its derivatives.
pub fn pair_loss(kind: Kind, p: Params, s: &PairScores) -> PairLoss {
    let beta = p.beta;
    match kind {
        Kind::Sft => PairLoss::default(),
        Kind::Dpo => {
            let (c, r) = (s.chosen - s.ref_chosen, s.rejected - s.ref_rejected);
            let x = beta * (c - r);
            // d(−log σ(x))/dx = −σ(−x).
            let g = -sigmoid(-x) * beta;
            PairLoss {
                loss: -log_sigmoid(x),
                d_chosen: g,
                d_rejected: -g,
                reward_chosen: beta * c,
                reward_rejected: beta * r,
                logps_chosen: s.chosen,
                logps_rejected: s.rejected,
                ..Default::default()
            }
        }
        Kind::Ipo => {
            let (c, r) = (s.chosen - s.ref_chosen, s.rejected - s.ref_rejected);
            let (nc, nr) = (s.len_chosen.max(1) as f64, s.len_rejected.max(1) as f64);
            let d = c / nc - r / nr - 1.0 / (2.0 * beta);
            PairLoss {
                loss: d * d,
                d_chosen: 2.0 * d / nc,
                d_rejected: -2.0 * d / nr,
                reward_chosen: beta * c,
                reward_rejected: beta * r,
                logps_chosen: s.chosen,
                logps_rejected: s.rejected,
                ..Default::default()
            }
        }
        Kind::Simpo => {
            let (kc, kr) = (s.n_chosen as f64, s.n_rejected as f64);
            let (ac, ar) = (s.chosen / kc, s.rejected / kr);
            let u = beta * (ac - ar) - p.gamma;
            let g = -sigmoid(-u) * beta;
            PairLoss {
                loss: -log_sigmoid(u),
                d_chosen: g / kc,
                d_rejected: -g / kr,
                reward_chosen: beta * ac,
                reward_rejected: beta * ar,
                logps_chosen: ac,
                logps_rejected: ar,
                ..Default::default()
            }
        }
        Kind::Orpo => {
            let (kc, kr) = (s.n_chosen as f64, s.n_rejected as f64);
            let (ac, ar) = (s.chosen / kc, s.rejected / kr);
            let x = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
            let ratio = log_sigmoid(x);
            // loss = −β·log σ(x); dx/da = 1/(1 − eᵃ) for the chosen, −1/(1 − eᵃ) for the rejected.
            let g = -beta * sigmoid(-x);
            PairLoss {
                loss: -beta * ratio,
                d_chosen: g / (-ac.exp_m1()) / kc,
                d_rejected: -g / (-ar.exp_m1()) / kr,
                reward_chosen: beta * ac,
                reward_rejected: beta * ar,
                logps_chosen: ac,
                logps_rejected: ar,
                ratio,
                log_odds: x,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of the loss by each sum agree with the derivatives given.
    #[test]
    fn derivatives_match_finite_differences() {
        let p = Params {
            beta: 0.3,
            gamma: 0.5,
        };
        let s = PairScores {
            chosen: -7.3,
            rejected: -9.1,
            n_chosen: 4,
            n_rejected: 6,
            len_chosen: 5,
            len_rejected: 6,
            ref_chosen: -7.0,
            ref_rejected: -8.2,
        };
        for kind in [Kind::Dpo, Kind::Ipo, Kind::Simpo, Kind::Orpo] {
            let l = pair_loss(kind, p, &s);
            let h = 1e-6;
            let f = |dc: f64, dr: f64| {
                pair_loss(
                    kind,
                    p,
                    &PairScores {
                        chosen: s.chosen + dc,
                        rejected: s.rejected + dr,
                        ..s
                    },
                )
                .loss
            };
            let dc = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
            let dr = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
            assert!(
                (dc - l.d_chosen).abs() < 1e-7,
                "{kind} chosen {dc} {}",
                l.d_chosen
            );
            assert!(
                (dr - l.d_rejected).abs() < 1e-7,
                "{kind} rejected {dr} {}",
                l.d_rejected
            );
        }
    }

    #[test]
    fn equal_policy_and_reference_give_ln2_and_zero_rewards() {
        let s = PairScores {
            chosen: -3.0,
            rejected: -4.0,
            ref_chosen: -3.0,
            ref_rejected: -4.0,
            n_chosen: 2,
            n_rejected: 2,
            len_chosen: 2,
            len_rejected: 2,
        };
        let l = pair_loss(
            Kind::Dpo,
            Params {
                beta: 0.1,
                gamma: 0.5,
            },
            &s,
        );
        assert!((l.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!((l.reward_chosen, l.reward_rejected), (0.0, 0.0));
        // IPO at equal policy and reference: (1/(2β))².
        let l = pair_loss(
            Kind::Ipo,
            Params {
                beta: 0.1,
                gamma: 0.5,
            },
            &s,
        );
        assert!((l.loss - 25.0).abs() < 1e-12);
    }

    #[test]
    fn stable_helpers() {
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert_eq!(log_sigmoid(800.0), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-16);
        for x in [-30.0, -1.0, -0.5, -1e-8] {
            assert!(
                (log1mexp(x) - (1.0 - f64::exp(x)).ln()).abs() < 1e-6 * (1.0 + log1mexp(x).abs())
            );
        }
    }
}
