//! Built-in tasks the CLI trains and replays by name (`hyperfunc train xor`).

use candle_core::{Device, Tensor};

use crate::data::Examples;
use crate::error::{Error, Result, TensorContext};
use crate::es::Es;
use crate::function::{Activation, HyperFn};
use crate::metric::{self, Metric};
use crate::param::ParamSpec;
use crate::system::Chain;

/// A system, its examples, its metric and default settings.
pub struct Task {
    /// The system.
    pub system: Chain,
    /// The training examples.
    pub examples: Examples,
    /// The metric.
    pub metric: Box<dyn Metric>,
    /// Default settings (direction included).
    pub es: Es,
}

/// The built-in tasks: name and one line.
pub const TASKS: &[(&str, &str)] = &[
    ("xor", "XOR with a 2-4-1 tanh/sigmoid network, binary cross-entropy (300 generations)"),
    ("teacher", "a 64→10 linear student of a random teacher on 1 024 examples, cross-entropy (benchmark Task A; 200 generations)"),
];

/// The task named `name`.
pub fn task(name: &str) -> Result<Task> {
    let dev = Device::Cpu;
    match name {
        "xor" => {
            let system = Chain::new(vec![
                HyperFn::linear("hidden", 2, 4, Activation::Tanh).noise_rank(2),
                HyperFn::linear("output", 4, 1, Activation::Sigmoid),
            ]);
            let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &dev).at("xor")?;
            let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &dev).at("xor")?;
            Ok(Task {
                system,
                examples: Examples::tensors(x, y)?,
                metric: Box::new(metric::bce()),
                es: Es::default()
                    .pop_size(64)
                    .sigma(0.1)
                    .lr(0.1)
                    .generations(300)
                    .seed(42)
                    .minimize(),
            })
        }
        "teacher" => {
            let data = crate::bench::task_a_data();
            let (c, d, n) = (10, 64, data.y_train.len());
            let student = HyperFn::linear_no_bias("student", d, c, Activation::Identity)
                .with_param("student.weight", ParamSpec::matrix(c, d).zeros());
            let x = Tensor::from_vec(data.x_train, (n, d), &dev).at("teacher")?;
            let y: Vec<f32> = data.y_train.iter().map(|&v| v as f32).collect();
            let y = Tensor::from_vec(y, n, &dev).at("teacher")?;
            Ok(Task {
                system: Chain::new(vec![student]),
                examples: Examples::tensors(x, y)?,
                metric: Box::new(metric::cross_entropy()),
                es: Es::default()
                    .pop_size(64)
                    .sigma(0.05)
                    .lr(0.05)
                    .generations(200)
                    .seed(1)
                    .minimize(),
            })
        }
        other => Err(Error::config(
            "task",
            format!(
                "unknown task `{other}`; built-in tasks: {}",
                TASKS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}
