//! What a variant earns: from a feedback event to the reward its posterior learns from.

use crate::error::BanditError;
use crate::posterior::Posterior;

/// One feedback event as the application posts it (one of the fields is set).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Feedback {
    /// `"revenue": 1.25`: money earned by the prediction.
    pub revenue: Option<f64>,
    /// `"converted": true`: a 0/1 outcome.
    pub converted: Option<bool>,
    /// `"reward": x`: a reward in the objective's own units.
    pub reward: Option<f64>,
}

/// What the bandit maximises for a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Probability of a 0/1 outcome (Beta–Bernoulli).
    Conversion,
    /// Revenue per prediction (Normal–Inverse-Gamma).
    Revenue,
    /// Revenue per prediction minus the variant's cost per prediction
    /// (Normal–Inverse-Gamma).
    Profit,
}

impl Objective {
    /// A fresh posterior with a weak default prior for this objective: uniform for
    /// conversion; for real rewards, mean 0 worth one observation and a vague variance.
    pub fn prior(self) -> Posterior {
        match self {
            Objective::Conversion => Posterior::beta(1.0, 1.0),
            Objective::Revenue | Objective::Profit => Posterior::gaussian(0.0, 1.0, 1.0, 1.0),
        }
    }

    /// The reward for `feedback` on a variant costing `cost_per_prediction` (currency
    /// units; `cost_per_1k / 1000`, plus measured latency × `cost_per_second` where
    /// configured). Refuses values the objective cannot take.
    pub fn reward(self, feedback: &Feedback, cost_per_prediction: f64) -> Result<f64, BanditError> {
        let finite = |field: &'static str, v: f64| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(BanditError::NotFinite { field, value: v })
            }
        };
        match self {
            Objective::Conversion => match (feedback.converted, feedback.reward, feedback.revenue) {
                (Some(c), None, None) => Ok(f64::from(u8::from(c))),
                (None, Some(r), None) => {
                    let r = finite("reward", r)?;
                    if r == 0.0 || r == 1.0 {
                        Ok(r)
                    } else {
                        Err(BanditError::WrongKind(format!(
                            "the conversion objective takes a `reward` of 0 or 1, got {r}"
                        )))
                    }
                }
                _ => Err(BanditError::WrongKind(
                    "the conversion objective takes `converted` (true/false) or `reward` (0 or 1)"
                        .into(),
                )),
            },
            Objective::Revenue | Objective::Profit => {
                let earned = match (feedback.revenue, feedback.reward, feedback.converted) {
                    (Some(v), None, None) => finite("revenue", v)?,
                    (None, Some(v), None) => finite("reward", v)?,
                    _ => {
                        return Err(BanditError::WrongKind(format!(
                            "the {} objective takes `revenue` or `reward` (a number)",
                            if self == Objective::Revenue {
                                "revenue"
                            } else {
                                "profit"
                            }
                        )))
                    }
                };
                Ok(if self == Objective::Profit {
                    earned - cost_per_prediction
                } else {
                    earned
                })
            }
        }
    }

    /// The reward counted for a decision whose feedback never came, under
    /// `missing_feedback: zero`: no conversion, no revenue (and, for profit, the cost
    /// was still paid).
    pub fn missing_reward(self, cost_per_prediction: f64) -> f64 {
        match self {
            Objective::Conversion | Objective::Revenue => 0.0,
            Objective::Profit => -cost_per_prediction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_objective_takes_its_own_feedback() {
        let conv = Feedback {
            converted: Some(true),
            ..Default::default()
        };
        let rev = Feedback {
            revenue: Some(2.5),
            ..Default::default()
        };
        assert_eq!(Objective::Conversion.reward(&conv, 0.1), Ok(1.0));
        assert_eq!(Objective::Revenue.reward(&rev, 0.1), Ok(2.5));
        assert_eq!(Objective::Profit.reward(&rev, 0.5), Ok(2.0));
        assert!(Objective::Conversion.reward(&rev, 0.0).is_err());
        assert!(Objective::Revenue.reward(&conv, 0.0).is_err());
        let half = Feedback {
            reward: Some(0.5),
            ..Default::default()
        };
        assert!(
            Objective::Conversion.reward(&half, 0.0).is_err(),
            "Seldon truncates this; we refuse it"
        );
        let nan = Feedback {
            revenue: Some(f64::NAN),
            ..Default::default()
        };
        assert!(matches!(
            Objective::Revenue.reward(&nan, 0.0),
            Err(BanditError::NotFinite { .. })
        ));
        let inf = Feedback {
            reward: Some(f64::INFINITY),
            ..Default::default()
        };
        assert!(Objective::Profit.reward(&inf, 0.0).is_err());
        assert_eq!(Objective::Profit.missing_reward(0.3), -0.3);
    }
}
