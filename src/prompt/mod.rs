//! Prompts as learnable parameters: signatures, `Predict`, and prompt learning.
//!
//! A prompt is part of θ ([`crate::Theta::prompt`]): ES never touches it, prompt learning
//! rewrites it, and `evaluate` uses whatever θ holds. A [`Signature`] describes a task (an
//! instruction plus ordered input and output fields); [`Predict`] turns one into an LLM
//! hyperfunction; [`PromptLearningOptimizer`] improves instructions by meta-prompting, keeping a
//! rewrite only when a held-out score improves; [`JointOptimizer`] alternates that with ES.

mod parse;
mod signature;

#[cfg(feature = "llm")]
pub(crate) use parse::fences;
pub use parse::{parse_fields, ParseFailure};
pub use signature::{Field, FieldType, HasSignature, Signature};

#[cfg(feature = "llm")]
mod predict;
#[cfg(feature = "llm")]
pub use predict::{JsonMode, Predict};
#[cfg(feature = "llm")]
mod joint;
#[cfg(feature = "llm")]
mod learn;
#[cfg(feature = "llm")]
pub use joint::{JointGeneration, JointOptimizer, JointReport, JointRound, JointStop};
#[cfg(feature = "llm")]
pub use learn::{
    FeedbackFn, NoOpPromptOptimizer, PromptCandidate, PromptLearningOptimizer, PromptOptimizer,
    PromptReport, PromptStop, Validation,
};
