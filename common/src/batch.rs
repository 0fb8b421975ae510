//! Coalescing concurrent requests into rounds: one round runs at a time, and each round
//! serves every request that arrived *before it started* (never one that arrived during
//! it). Under load one round serves many requests; at rest a request pays one round.
//!
//! Used for leadership confirmations (read index) and invalidation pushes, both network
//! rounds whose answer is valid for every request that was waiting when it began.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

pub struct Batcher<I, O> {
    requests: mpsc::UnboundedSender<(I, oneshot::Sender<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher { requests: self.requests.clone() }
    }
}

impl<I: Send + 'static, O: Clone + Send + 'static> Batcher<I, O> {
    /// Starts the task that runs `round` over the inputs of each batch.
    pub fn spawn<F, Fut>(round: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = O> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, oneshot::Sender<O>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut inputs = vec![first.0];
                let mut waiters = vec![first.1];
                while let Ok((input, waiter)) = rx.try_recv() {
                    inputs.push(input);
                    waiters.push(waiter);
                }
                let output = round(inputs).await;
                for waiter in waiters {
                    let _ = waiter.send(output.clone());
                }
            }
        });
        Batcher { requests: tx }
    }

    /// Asks for a round without waiting for it.
    pub fn send(&self, input: I) {
        let (tx, _) = oneshot::channel();
        let _ = self.requests.send((input, tx));
    }

    /// Waits for the first round that starts after this call; `None` if the task stopped.
    pub async fn submit(&self, input: I) -> Option<O> {
        let (tx, rx) = oneshot::channel();
        self.requests.send((input, tx)).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn requests_share_rounds_but_never_one_begun_before_them() {
        let rounds = Arc::new(AtomicU64::new(0));
        let counter = rounds.clone();
        let batcher = Batcher::spawn(move |inputs: Vec<u64>| {
            let counter = counter.clone();
            async move {
                // A round's answer is its number; a request must get a round that started
                // after it was submitted.
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                (n, inputs.len())
            }
        });
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (batcher, rounds) = (batcher.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                let started_before = rounds.load(Ordering::SeqCst);
                let (round, _) = batcher.submit(i).await.unwrap();
                assert!(round > started_before, "served by a round that began before the request");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(rounds.load(Ordering::SeqCst) < 50, "rounds were not shared");
    }
}
