//! What a distributed driver needs from a run: evaluate one range of a generation's pairs,
//! replay generations from their fitness alone, a hash of θ, and the state as bytes.
//!
//! Every worker holds the same [`EsRun`]. Per generation it evaluates the pairs it is handed
//! (the noise is regenerated from the seed, the generation and the pair, so nothing but the
//! range travels), sends back their fitness, and then applies the same update from the full
//! fitness vector with [`EsRun::tell_all`]. θ never travels; only a worker that restarts needs a
//! checkpoint ([`EsRun::checkpoint`]) and the fitness of the generations since
//! ([`EsRun::replay`]).

use std::ops::Range;

use super::EsRun;
use crate::data::Examples;
use crate::error::{Error, Result};
use crate::metric::Metric;
use crate::observe::Trace;
use crate::population::evaluate_with;
use crate::runs::checkpoint;
use crate::system::HyperSystem;

impl EsRun {
    /// Units of work in a generation: antithetic pairs (two candidates each), or single
    /// candidates when the run is not antithetic.
    pub fn pairs(&self) -> usize {
        if self.es.antithetic {
            self.es.pop_size / 2
        } else {
            self.es.pop_size
        }
    }

    /// Candidates in one unit of [`EsRun::pairs`] (2 for antithetic pairs, else 1).
    pub fn candidates_per_pair(&self) -> usize {
        if self.es.antithetic {
            2
        } else {
            1
        }
    }

    /// The fitness of the candidates of `pairs` in the current generation (two per pair, in
    /// population order), evaluated with the batched engine. The values are bit-identical to
    /// the same candidates' fitness in a whole-population evaluation, so workers that split a
    /// generation between them get the θ of a single process.
    ///
    /// # Examples
    /// ```
    /// use hyperfunc::prelude::*;
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let net = Chain::new(vec![HyperFn::linear("f", 2, 1, Activation::Identity)]);
    /// let x = [vec![0.0, 1.0], vec![1.0, 0.0]];
    /// let data = Examples::from_rows(&x, &[vec![1.0], vec![0.0]], &candle_core::Device::Cpu)?;
    /// let mut run = Es::default().pop_size(8).seed(3).start(&net)?;
    /// let all = run.evaluate_pairs(&net, &data, &metric::mse(), 0..4).await?;
    /// let part = run.evaluate_pairs(&net, &data, &metric::mse(), 1..3).await?;
    /// assert_eq!(&all[2..6], &part[..]);
    /// run.tell(&all)?;
    /// assert_eq!(run.generation(), 1);
    /// # Ok::<(), hyperfunc::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn evaluate_pairs<S: HyperSystem + ?Sized>(
        &mut self,
        sys: &S,
        examples: &Examples,
        metric: &dyn Metric,
        pairs: Range<usize>,
    ) -> Result<Vec<f32>> {
        let total = self.pairs();
        if pairs.start >= pairs.end || pairs.end > total {
            return Err(Error::config(
                "evaluate_pairs",
                format!(
                    "pairs {}..{} are not a non-empty range of this generation's 0..{total}",
                    pairs.start, pairs.end
                ),
            ));
        }
        let per = self.candidates_per_pair();
        let pop = self.ask_shared()?;
        let part = pop.select(pairs.start * per, (pairs.end - pairs.start) * per)?;
        let examples = self.es.examples_of(examples, self.generation)?;
        let eval = evaluate_with(
            &self.reg,
            sys,
            std::sync::Arc::new(part),
            &examples,
            metric,
            self.es.max_batch_size,
            Trace::default(),
        )
        .await?;
        Ok(eval.fitness)
    }

    /// Applies the current generation's update from its whole fitness vector, whether or not
    /// this worker evaluated any of it (the noise is drawn from the seed when it has not).
    pub fn tell_all(&mut self, fitness: &[f32]) -> Result<super::Told> {
        self.ask_shared()?;
        self.tell(fitness)
    }

    /// Applies generations whose fitness is known without evaluating anything
    /// ([`EsRun::tell_all`] for each vector). A worker that restarted from a checkpoint catches
    /// up with the others this way.
    pub fn replay(&mut self, fitness_log: &[Vec<f32>]) -> Result<()> {
        for f in fitness_log {
            self.tell_all(f)?;
        }
        Ok(())
    }

    /// A 64-bit hash (FNV-1a) of θ's names, shapes, bits and prompts and of the generation:
    /// workers that hold the same state give the same hash, one bit of difference another.
    pub fn theta_hash(&self) -> Result<u64> {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(PRIME);
            }
        };
        eat(&(self.generation as u64).to_le_bytes());
        for (name, t) in self.theta.iter() {
            eat(name.as_bytes());
            for d in t.dims() {
                eat(&(*d as u64).to_le_bytes());
            }
            for v in self.theta.values(name)? {
                eat(&v.to_bits().to_le_bytes());
            }
        }
        for (name, p) in self.theta.prompts() {
            eat(name.as_bytes());
            eat(p.as_bytes());
        }
        Ok(h)
    }

    /// The run's state as bytes: θ, the optimiser's step count and moments, the generation
    /// (safetensors, the format of a run store's checkpoints). Noise is not in it: it is
    /// regenerated from the seed.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        let (steps, m, v) = self.moments();
        let state = checkpoint::State {
            theta: self.theta.clone(),
            m,
            v,
            meta: checkpoint::Meta {
                generation: self.generation,
                steps,
                ..Default::default()
            },
        };
        checkpoint::encode(&state).map_err(|e| Error::config("checkpoint", e))
    }

    /// Puts the state of [`EsRun::checkpoint`]'s bytes in place (same system and settings).
    pub fn restore_checkpoint(&mut self, bytes: &[u8]) -> Result<()> {
        let s = checkpoint::decode(bytes, self.device()).map_err(|e| {
            Error::config(
                "restore_checkpoint",
                format!("{e}; give the bytes EsRun::checkpoint returned"),
            )
        })?;
        s.theta.check(&self.reg)?;
        self.restore(s.theta, s.m, s.v, s.meta.steps, s.meta.generation);
        Ok(())
    }
}
