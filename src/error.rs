//! The one error type of the crate.
//!
//! Every variant carries what a user needs to fix the problem: the hyperfunction, the parameter, the
//! shapes involved, the setting and its allowed range. Nothing here knows about the modules that
//! raise these errors.

use std::time::Duration;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in hyperfunc.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor did not have the shape a hyperfunction, parameter or metric expects.
    #[error("shape mismatch in `{function}`: {what} expected {expected}, got {actual:?}")]
    ShapeMismatch {
        /// Hyperfunction, parameter or metric that saw the tensor.
        function: String,
        /// Which tensor (input, θ, output, targets…).
        what: String,
        /// The expected shape, in words (`[P, N, 2]`, `last dim 4`…).
        expected: String,
        /// The shape that arrived.
        actual: Vec<usize>,
    },

    /// Antithetic sampling pairs every perturbation with its negation, so the population must be even.
    #[error("population size {pop_size} is odd; antithetic sampling needs an even size (use {suggest} or disable antithetic sampling)")]
    OddPopulation {
        /// The size that was asked for.
        pop_size: usize,
        /// The nearest even size above it.
        suggest: usize,
    },

    /// There were no examples to evaluate on.
    #[error("no examples: evaluation needs at least one example")]
    EmptyExamples,

    /// Two hyperfunctions (or two parameters) of one system share a name.
    #[error(
        "duplicate name `{name}`: hyperfunction and parameter names must be unique within a system"
    )]
    DuplicateName {
        /// The repeated name.
        name: String,
    },

    /// The ES noise scale must be positive and finite.
    #[error("sigma must be positive and finite, got {sigma}")]
    InvalidSigma {
        /// The value that was given.
        sigma: f64,
    },

    /// A configuration value is out of its allowed range.
    #[error("invalid setting `{field}`: {reason}")]
    InvalidConfig {
        /// The setting.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A system called a hyperfunction it did not declare in [`crate::HyperSystem::hyperfunctions`].
    #[error(
        "hyperfunction `{name}` was called but is not declared by the system's `hyperfunctions()`"
    )]
    UndeclaredFunction {
        /// The function that was called.
        name: String,
    },

    /// θ has no tensor for a parameter the system declares (or has one of the wrong shape).
    #[error("parameter `{name}` is missing from θ")]
    MissingParameter {
        /// The parameter name (`function.param`).
        name: String,
    },

    /// A value had the wrong kind for the operation (a tensor where JSON items were needed…).
    #[error("`{function}` expected {expected}, got {actual}")]
    WrongValueKind {
        /// The hyperfunction or primitive that received the value.
        function: String,
        /// What it needs.
        expected: &'static str,
        /// What arrived.
        actual: &'static str,
    },

    /// The system took a different path of calls for different chunks of the population, which
    /// breaks the control-flow invariance assumption of batched evaluation.
    #[error("control flow diverged between chunks: chunk 0 called [{first}], chunk {chunk} called [{other}]; a system must call the same hyperfunctions in the same order for every candidate and example")]
    ControlFlowDivergence {
        /// Index of the chunk that diverged.
        chunk: usize,
        /// The call sequence of the first chunk.
        first: String,
        /// The call sequence of the diverging chunk.
        other: String,
    },

    /// An async hyperfunction failed.
    #[error("`{function}` failed: {message}{}", if *retryable { " (retryable)" } else { "" })]
    Io {
        /// The hyperfunction.
        function: String,
        /// What its body reported.
        message: String,
        /// Whether retrying could help.
        retryable: bool,
    },

    /// An async hyperfunction got an answer it could not parse into its outputs (for instance
    /// a model that ignored the requested format). Counts against the candidate.
    #[error(
        "`{function}` could not parse its output: {message}; the output was: {}",
        clip(output)
    )]
    Parse {
        /// The hyperfunction.
        function: String,
        /// What was missing or malformed.
        message: String,
        /// The raw output.
        output: String,
    },

    /// An async hyperfunction did not finish within its timeout.
    #[error("`{function}` timed out after {after:?}")]
    Timeout {
        /// The hyperfunction.
        function: String,
        /// The timeout that expired.
        after: Duration,
    },

    /// An async hyperfunction exhausted its call budget for this evaluation.
    #[error("`{function}` exhausted its budget of {max_calls} calls for this evaluation")]
    BudgetExhausted {
        /// The hyperfunction.
        function: String,
        /// The budget.
        max_calls: usize,
    },

    /// Every candidate of a generation failed or produced a non-finite fitness, or more than the
    /// allowed fraction did.
    #[error("generation {generation}: {failed} of {pop_size} candidates failed or gave non-finite fitness (allowed fraction {allowed})")]
    TooManyFailures {
        /// Generation index.
        generation: usize,
        /// Failed candidates.
        failed: usize,
        /// Population size.
        pop_size: usize,
        /// The configured maximum failure fraction.
        allowed: f64,
    },

    /// A tensor operation failed inside a hyperfunction body or metric.
    #[error("tensor error in `{function}`: {source}")]
    Tensor {
        /// Where it happened.
        function: String,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },

    /// An agent runner could not go on: a malformed episode or conversation, a failing
    /// environment, or a policy output that is not an action.
    #[error("{runner}: {message}")]
    Agent {
        /// The runner (`game`, `chat`) and where.
        runner: String,
        /// What went wrong and what to fix.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A memory store URL could not be opened (unknown scheme, unreachable server, bad path).
    #[error("cannot open memory store `{url}`: {reason}")]
    MemoryUrl {
        /// The URL or path, with any password removed.
        url: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// A memory store URL needs a cargo feature this build of hyperfunc lacks.
    #[error(
        "{what} needs the cargo feature `{feature}`: build hyperfunc with `--features {feature}`"
    )]
    FeatureDisabled {
        /// The feature to enable.
        feature: &'static str,
        /// What asked for it.
        what: String,
    },

    /// A memory entry, query or setting has an invalid value.
    #[error("invalid memory {field}: {reason}")]
    InvalidMemory {
        /// The field (`importance`, `user_id`, `weights`…).
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// The memory database stayed locked by other writers for longer than the busy timeout.
    #[error("memory {op}: the database stayed locked by other writers for more than {waited:?}; retry, shorten other writers' transactions, or use PostgreSQL for many concurrent writers")]
    MemoryBusy {
        /// The operation (`add`, `retrieve`…).
        op: &'static str,
        /// The busy timeout that expired.
        waited: Duration,
    },

    /// A memory database operation failed.
    #[error("memory {op} failed: {message}")]
    Memory {
        /// The operation (`add`, `retrieve`…).
        op: &'static str,
        /// What the database reported.
        message: String,
    },

    /// A tuned call was set up wrongly (no choices, a repeated choice, a setting out of range).
    #[error("tune `{label}`: {reason}")]
    TuneConfig {
        /// The tune label (empty for tuner-wide settings).
        label: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A choice named by `Policy::Fixed` is not among the call's choices.
    #[error("tune `{label}`: unknown choice `{choice}`; the choices are {choices:?}")]
    TuneUnknownChoice {
        /// The tune label.
        label: String,
        /// The name that was asked for.
        choice: String,
        /// The call's choices.
        choices: Vec<String>,
    },

    /// A reward or cost that is not a finite number in its range.
    #[error("tune: {what} must be {expected}, got {value}")]
    TuneValue {
        /// `reward` or `cost`.
        what: &'static str,
        /// The allowed range, in words.
        expected: &'static str,
        /// The value that was given.
        value: f64,
    },

    /// A reward or cost was reported for a call the tuner does not know, or twice.
    #[error("tune: call {call_id}: {reason}")]
    TuneCall {
        /// The call id.
        call_id: u64,
        /// What is wrong.
        reason: String,
    },

    /// The tune store could not be opened, read or written.
    #[error("tune store `{path}`: {reason}")]
    TuneStore {
        /// The store file.
        path: String,
        /// What SQLite reported and what to do.
        reason: String,
    },

    /// The run store could not be opened, read or written.
    #[error("run store `{path}`: {reason}")]
    RunStore {
        /// The store file or directory.
        path: String,
        /// What went wrong and what to do.
        reason: String,
    },

    /// A run id that the store does not hold.
    #[error("run {run} is not in the run store; it holds {known}")]
    RunNotFound {
        /// The id asked for.
        run: i64,
        /// The ids it holds, in words.
        known: String,
    },

    /// A control command was refused (unknown setting, wrong type, out of range, restart-only,
    /// or a combination the engine does not allow). Nothing of it was applied.
    #[error("run {run}: command refused: {reason}")]
    RunCommand {
        /// The run.
        run: i64,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// A run was continued with settings that differ from the ones it started with.
    #[error("run {run} started with other settings ({fields}); start a new run, or continue it with the settings it has (`hyperfunc runs show {run}`)")]
    RunConfigMismatch {
        /// The run.
        run: i64,
        /// The differing settings, `name: stored → given`.
        fields: String,
    },

    /// A price or a price table is wrong (negative, not finite, unparsable date, unknown model).
    #[error("price {what}: {reason}")]
    Price {
        /// The model, endpoint or table entry.
        what: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl Error {
    /// Wraps a candle error with the place it happened.
    pub(crate) fn tensor(function: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
        let function = function.into();
        move |source| Error::Tensor { function, source }
    }

    /// A configuration error.
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether retrying the operation could succeed (timeouts and retryable I/O errors).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Io {
                retryable: true,
                ..
            } | Error::Timeout { .. }
        )
    }
}

/// The first 200 characters of a text, for error messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{:?}…", &s[..i]),
        None => format!("{s:?}"),
    }
}

/// Extension to attach a location to candle results.
pub(crate) trait TensorContext<T> {
    /// Maps a candle error to [`Error::Tensor`] naming `function`.
    fn at(self, function: &str) -> Result<T>;
}

impl<T> TensorContext<T> for candle_core::Result<T> {
    fn at(self, function: &str) -> Result<T> {
        self.map_err(Error::tensor(function))
    }
}
