//! The event loop: clients arrive, browse and buy through the three tiers; once a simulated
//! second the tiers are sampled and the policy decides.
//!
//! Every source of events produces them in time order (arrivals by construction, a tier's
//! completions and boots because their durations are constant, buys' writes likewise), so the
//! next event is the earliest of eight queue fronts: no heap, no allocation per request.
//! Ties go to boots, then completions (frontend, catalog, order), then writes, then arrivals,
//! and events at a second boundary happen before that second's sample.

use std::collections::VecDeque;

use quire_common::capacity::Costs;
use quire_loadgen::model::{ClientModel, Op, Outcome, Status};
use quire_loadgen::report::Recorder;
use rand::distributions::{Bernoulli, Distribution};
use rand::rngs::StdRng;
use rand::Rng;

use crate::policy::{Observation, Policy, TierKind};

use super::tier::Tier;
use super::{micros, Micros, SECOND};

const FRONTEND: usize = 0;
const CATALOG: usize = 1;
const ORDER: usize = 2;

/// A client between arrival and leaving; it has exactly one request in flight.
#[derive(Debug, Clone, Copy)]
struct Client {
    op: Op,
    /// Browses still to do, the current one included.
    browses_left: u32,
    /// When the current request was sent: its deadline counts from here.
    sent: Micros,
    /// When it joined its current tier's queue.
    joined: Micros,
}

/// The client's random choices, drawn from one stream in a fixed order.
struct Choices {
    rng: StdRng,
    search: Bernoulli,
    hit: Bernoulli,
    buy: Bernoulli,
    browses: (u32, u32),
}

/// Counts kept for tests and the performance figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Events processed (arrivals, slot completions, boots, writes; not the per-second ticks).
    pub events: u64,
    /// Requests sent by clients.
    pub requests: u64,
    pub clients: u64,
}

pub(super) struct Engine<'r> {
    now: Micros,
    tiers: [Tier; 3],
    /// Buys whose order slot is done, waiting for their Raft writes: (answered at, client).
    writes: VecDeque<(Micros, u32)>,
    clients: Vec<Client>,
    free_ids: Vec<u32>,
    active: u32,
    /// When the last client left so far.
    last_departure: Micros,
    choices: Choices,
    costs: Costs,
    boot: Micros,
    write_latency: Micros,
    /// Deadline budget of each op, in `Op` order.
    budget: [Micros; 3],
    /// Fixed costs known to remain after a tier's slot, by tier and op: what a server checks,
    /// together with its own slot time, against the deadline. A frontend does not know whether
    /// a lookup will hit its cache, so it counts none for lookups.
    after: [[Micros; 3]; 3],
    policy: Box<dyn Policy>,
    recorder: &'r mut Recorder,
    pub tally: Tally,
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Lookup => 0,
        Op::Search => 1,
        Op::Buy => 2,
    }
}

/// Whether a client's request, served by a tier from now to `done` and then costing `after`
/// (per operation) downstream, would end past its deadline (`budget` from when it was sent):
/// the pre-drop test of the tier's queue head.
fn hopeless<'a>(
    clients: &'a [Client],
    budget: &'a [Micros; 3],
    after: &'a [Micros; 3],
    done: Micros,
) -> impl Fn(u32) -> bool + 'a {
    move |c| {
        let client = &clients[c as usize];
        let op = op_index(client.op);
        done + after[op] > client.sent + budget[op]
    }
}

fn seconds(t: Micros) -> f64 {
    t as f64 / 1e6
}

fn millis(t: Micros) -> f64 {
    t as f64 / 1e3
}

impl<'r> Engine<'r> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        costs: Costs,
        model: &ClientModel,
        rng: StdRng,
        initial: [u32; 3],
        floors: [u32; 3],
        max: [u32; 3],
        policy: Box<dyn Policy>,
        recorder: &'r mut Recorder,
    ) -> anyhow::Result<Self> {
        let service = TierKind::ALL.map(|kind| micros(kind.service_time(&costs)));
        let tiers =
            [0, 1, 2].map(|i| Tier::new(TierKind::ALL[i], service[i], costs.slots, initial[i], floors[i], max[i]));
        let write_latency = micros(costs.buy_write_latency());
        let browse = micros(model.browse_timeout);
        let choices = Choices {
            rng,
            search: Bernoulli::new(model.search_share)?,
            hit: Bernoulli::new(model.lookup_hit_ratio)?,
            buy: Bernoulli::new(model.buy_probability)?,
            browses: (model.min_browses.max(1), model.max_browses.max(model.min_browses.max(1))),
        };
        Ok(Engine {
            now: 0,
            tiers,
            writes: VecDeque::with_capacity(4096),
            clients: Vec::with_capacity(16_384),
            free_ids: Vec::with_capacity(16_384),
            active: 0,
            last_departure: 0,
            choices,
            costs,
            boot: micros(costs.boot),
            write_latency,
            budget: [browse, browse, micros(model.buy_timeout)],
            after: [[0, service[CATALOG], service[ORDER] + write_latency], [0; 3], [0, 0, write_latency]],
            policy,
            recorder,
            tally: Tally::default(),
        })
    }

    /// Runs every arrival of `arrivals` (seconds, in order) to its end, sampling and deciding
    /// once a second; returns when the run ended: at `duration` or when the last client left,
    /// whichever is later (as `quire load` measures).
    pub fn run(&mut self, mut arrivals: impl Iterator<Item = f64>, duration: Micros) -> Micros {
        let mut next_arrival = arrivals.next().map(|t| (t * 1e6).round() as Micros);
        let mut tick = SECOND;
        for tier in &self.tiers {
            self.recorder.servers(0.0, tier.kind.name(), tier.running());
        }
        loop {
            // The earliest event, ties to the first source checked.
            let mut at = Micros::MAX;
            let mut source = Source::Arrival;
            for (i, tier) in self.tiers.iter().enumerate() {
                if let Some(t) = tier.next_ready() {
                    if t < at {
                        (at, source) = (t, Source::Ready(i));
                    }
                }
            }
            for (i, tier) in self.tiers.iter().enumerate() {
                if let Some(t) = tier.next_completion() {
                    if t < at {
                        (at, source) = (t, Source::Completion(i));
                    }
                }
            }
            if let Some(&(t, _)) = self.writes.front() {
                if t < at {
                    (at, source) = (t, Source::Written);
                }
            }
            if let Some(t) = next_arrival {
                if t < at {
                    (at, source) = (t, Source::Arrival);
                }
            }
            if at > tick {
                // The run ends when the profile has and every client has left, whichever is later.
                if next_arrival.is_none() && self.active == 0 {
                    let end = duration.max(self.last_departure);
                    if tick > end {
                        return end;
                    }
                }
                self.tick(tick);
                tick += SECOND;
                continue;
            }
            self.now = at;
            self.tally.events += 1;
            match source {
                Source::Ready(i) => {
                    self.tiers[i].boot_next();
                    self.dispatch(i);
                }
                Source::Completion(i) => self.complete(i),
                Source::Written => {
                    if let Some((_, c)) = self.writes.pop_front() {
                        self.answered(c);
                    }
                }
                Source::Arrival => {
                    self.arrive();
                    next_arrival = arrivals.next().map(|t| (t * 1e6).round() as Micros);
                }
            }
        }
    }

    /// Server-seconds of each tier up to `end`.
    pub fn server_seconds(&mut self, end: Micros) -> [(TierKind, f64); 3] {
        [0, 1, 2].map(|i| (self.tiers[i].kind, self.tiers[i].server_seconds(end)))
    }

    fn arrive(&mut self) {
        let (lo, hi) = self.choices.browses;
        let browses = self.choices.rng.gen_range(lo..=hi);
        let client = Client { op: Op::Lookup, browses_left: browses, sent: 0, joined: 0 };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.clients[id as usize] = client;
                id
            }
            None => {
                self.clients.push(client);
                (self.clients.len() - 1) as u32
            }
        };
        self.active += 1;
        self.tally.clients += 1;
        self.recorder.arrival(seconds(self.now));
        self.browse(id);
    }

    fn browse(&mut self, c: u32) {
        let op = if self.choices.search.sample(&mut self.choices.rng) { Op::Search } else { Op::Lookup };
        self.send(c, op);
    }

    fn send(&mut self, c: u32, op: Op) {
        let client = &mut self.clients[c as usize];
        client.op = op;
        client.sent = self.now;
        self.tally.requests += 1;
        self.enqueue(FRONTEND, c);
    }

    fn enqueue(&mut self, i: usize, c: u32) {
        self.clients[c as usize].joined = self.now;
        self.tiers[i].enqueue(c, self.now);
        self.dispatch(i);
    }

    /// Fills tier `i`'s free slots from its queue, dropping hopeless heads.
    fn dispatch(&mut self, i: usize) {
        let now = self.now;
        let service = self.tiers[i].service;
        loop {
            let hopeless = hopeless(&self.clients, &self.budget, &self.after[i], now + service);
            match self.tiers[i].dispatch(now, hopeless) {
                None => return,
                Some((_, Ok(()))) => {}
                Some((c, Err(_))) => self.dropped(c),
            }
        }
    }

    fn complete(&mut self, i: usize) {
        let Some(c) = self.tiers[i].completing_client() else { return };
        let joined = self.clients[c as usize].joined;
        self.tiers[i].complete(self.now, joined);
        self.dispatch(i);
        match i {
            FRONTEND => match self.clients[c as usize].op {
                Op::Lookup if self.choices.hit.sample(&mut self.choices.rng) => self.answered(c),
                Op::Lookup | Op::Search => self.enqueue(CATALOG, c),
                Op::Buy => self.enqueue(ORDER, c),
            },
            CATALOG => self.answered(c),
            _ => self.writes.push_back((self.now + self.write_latency, c)),
        }
    }

    fn deadline(&self, c: u32) -> Micros {
        let client = &self.clients[c as usize];
        client.sent + self.budget[op_index(client.op)]
    }

    /// The store shed the client's request: the client leaves, dropped; unless the request had
    /// waited past its deadline behind requests with later ones (only the head of a queue is
    /// checked), in which case the client had given up already.
    fn dropped(&mut self, c: u32) {
        let deadline = self.deadline(c);
        if self.now > deadline {
            return self.gave_up(c, deadline);
        }
        let client = self.clients[c as usize];
        self.recorder.request(seconds(self.now), client.op, millis(self.now - client.sent), Outcome::Dropped);
        self.leave(c, Status::Dropped);
    }

    /// The client stopped waiting at its deadline and left, timed out.
    fn gave_up(&mut self, c: u32, deadline: Micros) {
        let client = self.clients[c as usize];
        self.recorder.request(seconds(deadline), client.op, millis(deadline - client.sent), Outcome::Late);
        self.recorder.client(seconds(deadline), Status::Timeout);
        self.release(c);
    }

    /// The client's request was answered at `now`.
    fn answered(&mut self, c: u32) {
        let client = self.clients[c as usize];
        let deadline = self.deadline(c);
        if self.now > deadline {
            // Not with exact drop checks, but kept honest: the store finished the work anyway.
            return self.gave_up(c, deadline);
        }
        self.recorder.request(seconds(self.now), client.op, millis(self.now - client.sent), Outcome::Ok);
        if client.op == Op::Buy {
            return self.leave(c, Status::Purchased);
        }
        let left = client.browses_left - 1;
        self.clients[c as usize].browses_left = left;
        if left > 0 {
            self.browse(c);
        } else if self.choices.buy.sample(&mut self.choices.rng) {
            self.send(c, Op::Buy);
        } else {
            self.leave(c, Status::Ok);
        }
    }

    fn leave(&mut self, c: u32, status: Status) {
        self.recorder.client(seconds(self.now), status);
        self.release(c);
    }

    fn release(&mut self, c: u32) {
        self.free_ids.push(c);
        self.active -= 1;
        self.last_departure = self.now;
    }

    /// The second ending at `at`: the balancers drop hopeless heads, the tiers are sampled, the
    /// policy decides, and the running servers are recorded.
    fn tick(&mut self, at: Micros) {
        self.now = at;
        for i in 0..3 {
            let service = self.tiers[i].service;
            loop {
                let hopeless = hopeless(&self.clients, &self.budget, &self.after[i], at + service);
                match self.tiers[i].purge_head(hopeless) {
                    Some(c) => self.dropped(c),
                    None => break,
                }
            }
        }
        let tiers = self.tiers.iter_mut().map(|t| t.observe(at, SECOND)).collect();
        let obs = Observation { now: seconds(at), costs: self.costs, tiers };
        for decision in self.policy.decide(&obs) {
            if let Some(tier) = self.tiers.iter_mut().find(|t| t.kind == decision.tier) {
                tier.scale_to(decision.target, at, self.boot);
            }
        }
        for tier in &self.tiers {
            self.recorder.servers(seconds(at), tier.kind.name(), tier.running());
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Ready(usize),
    Completion(usize),
    Written,
    Arrival,
}
