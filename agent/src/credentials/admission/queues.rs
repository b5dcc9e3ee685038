//! The calls waiting for their turn: one FIFO queue per [`Share`] (a pod the kernel saw, or every
//! caller it could not place), served round-robin, and the renewals' queue.
//!
//! - Each round, every share with a call waiting gets one turn, in the order the shares came; a
//!   share that joins mid-round goes before those already served. One pod's backlog so costs
//!   another pod's first request one turn at most, never its place behind the backlog.
//! - Renewals get one turn at the end of each round, and every turn when no first fetch waits: a
//!   pod's first fetch goes before them, and no backlog can starve them.
//! - A throttled call goes back to the head of its own share's queue (by its number).
//! - Bounded: each share holds at most its cap, and there are at most [`MAX_POD_SHARES`] pods'
//!   queues; a pod past that bound shares the unplaced callers' queue.
//!
//! Data structure only: the pacer ([`super::Admission`]) decides when a turn is due.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::Permit;

/// Whose share of the first-fetch queue a call spends: the pod the kernel placed its caller in,
/// or the one share of every caller it could not place. Never what a token claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Share {
    /// A pod, by its UID as the kernel's cgroup names it.
    Pod(Arc<str>),
    /// Callers without a pod (no kernel record, a cgroup that is not a pod's).
    Unplaced,
}

/// At most this many pods have a queue of their own at once (a node runs a few hundred pods at
/// most); past it, calls of further pods wait in the unplaced callers' queue.
pub const MAX_POD_SHARES: usize = 1024;

/// A call waiting for its turn.
pub(super) struct Waiting {
    pub seq: u64,
    pub tx: oneshot::Sender<Permit>,
}

/// Which queue the next turn goes to.
enum Slot {
    Cold,
    Renewal,
}

#[derive(Default)]
pub(super) struct Queues {
    /// Only shares with calls waiting.
    shares: HashMap<Share, VecDeque<Waiting>>,
    /// Shares with calls waiting that have not had their turn this round, in the order they came.
    pending: VecDeque<Share>,
    /// Shares that had their turn this round and still have calls waiting.
    served: VecDeque<Share>,
    renewals: VecDeque<Waiting>,
    cold: usize,
}

impl Queues {
    /// First fetches waiting.
    pub fn cold_len(&self) -> usize {
        self.cold
    }

    pub fn renewals_len(&self) -> usize {
        self.renewals.len()
    }

    /// First fetches of `share` waiting.
    pub fn len_of(&self, share: &Share) -> usize {
        self.shares.get(share).map_or(0, VecDeque::len)
    }

    /// The share a call of `share` waits in: its own, unless too many pods have one already.
    pub fn placed(&self, share: Share) -> Share {
        let pods = self.shares.len() - usize::from(self.shares.contains_key(&Share::Unplaced));
        match share {
            Share::Pod(_) if pods >= MAX_POD_SHARES && !self.shares.contains_key(&share) => {
                Share::Unplaced
            }
            share => share,
        }
    }

    /// Adds a first fetch at the back of its share's queue.
    pub fn push_cold(&mut self, share: Share, waiting: Waiting) {
        self.cold += 1;
        match self.shares.get_mut(&share) {
            Some(queue) => queue.push_back(waiting),
            None => {
                self.shares.insert(share.clone(), VecDeque::from([waiting]));
                self.pending.push_back(share);
            }
        }
    }

    /// Puts a throttled first fetch back in its share's queue, before every call numbered after
    /// it; a share that had no call waiting goes first in the round.
    pub fn requeue(&mut self, share: Share, waiting: Waiting) {
        self.cold += 1;
        match self.shares.get_mut(&share) {
            Some(queue) => {
                let at = queue.partition_point(|w| w.seq < waiting.seq);
                queue.insert(at, waiting);
            }
            None => {
                self.shares.insert(share.clone(), VecDeque::from([waiting]));
                self.pending.push_front(share);
            }
        }
    }

    pub fn push_renewal(&mut self, waiting: Waiting) {
        self.renewals.push_back(waiting);
    }

    /// Turns that go before the call numbered `seq` of `share` (or, when it is not queued, before
    /// one added at the back): its place in its own queue, a turn per round of every other share
    /// (while it has calls) and of the renewals, and the shares ahead of its own in the round.
    pub fn turns_ahead(&self, share: &Share, seq: u64) -> usize {
        let own = self
            .shares
            .get(share)
            .map_or(0, |q| q.partition_point(|w| w.seq < seq));
        let rounds: usize = self
            .shares
            .iter()
            .filter(|(s, _)| *s != share)
            .map(|(_, q)| q.len().min(own))
            .sum();
        let renewal = usize::from(!self.renewals.is_empty());
        let in_round = if let Some(i) = self.pending.iter().position(|s| s == share) {
            i
        } else if let Some(j) = self.served.iter().position(|s| s == share) {
            // Its turn this round is over: after the rest of the round and its renewal.
            self.pending.len() + renewal + j
        } else {
            // A share with nothing queued joins the round at its end.
            self.pending.len()
        };
        own + rounds + self.renewals.len().min(own) + in_round
    }

    /// Drops given-up calls where the next turn goes (they cost no turn); whether a live call
    /// waits for it.
    pub fn ready(&mut self) -> bool {
        loop {
            match self.next_slot() {
                None => return false,
                Some(Slot::Renewal) => {
                    drop_closed(&mut self.renewals);
                    if !self.renewals.is_empty() {
                        return true;
                    }
                }
                Some(Slot::Cold) => {
                    let Some(share) = self.pending.front() else {
                        continue;
                    };
                    let Some(queue) = self.shares.get_mut(share) else {
                        self.pending.pop_front();
                        continue;
                    };
                    let before = queue.len();
                    drop_closed(queue);
                    self.cold -= before - queue.len();
                    if !queue.is_empty() {
                        return true;
                    }
                    self.shares.remove(share);
                    self.pending.pop_front();
                }
            }
        }
    }

    /// The call whose turn it is (after [`Self::ready`] said one waits).
    pub fn pop(&mut self) -> Option<Waiting> {
        match self.next_slot()? {
            Slot::Renewal => {
                let waiting = self.renewals.pop_front();
                // The round is over: every share served takes part in the next.
                self.new_round();
                waiting
            }
            Slot::Cold => {
                let share = self.pending.pop_front()?;
                let queue = self.shares.get_mut(&share)?;
                let waiting = queue.pop_front();
                if queue.is_empty() {
                    self.shares.remove(&share);
                } else {
                    self.served.push_back(share);
                }
                self.cold -= usize::from(waiting.is_some());
                waiting
            }
        }
    }

    /// Fails every waiting call (their senders dropped).
    pub fn clear(&mut self) {
        *self = Queues::default();
    }

    /// Where the next turn goes: a share not served this round, else a renewal (which ends the
    /// round), else a new round.
    fn next_slot(&mut self) -> Option<Slot> {
        if !self.pending.is_empty() {
            return Some(Slot::Cold);
        }
        if !self.renewals.is_empty() {
            return Some(Slot::Renewal);
        }
        if self.served.is_empty() {
            return None;
        }
        self.new_round();
        Some(Slot::Cold)
    }

    fn new_round(&mut self) {
        if self.pending.is_empty() {
            std::mem::swap(&mut self.pending, &mut self.served);
        } else {
            self.pending.append(&mut self.served);
        }
    }
}

/// Drops the given-up calls at the head of `queue`.
fn drop_closed(queue: &mut VecDeque<Waiting>) {
    while queue.front().is_some_and(|w| w.tx.is_closed()) {
        queue.pop_front();
    }
}
