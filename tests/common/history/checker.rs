//! Checks a [`History`]:
//!
//! - the recorder's stream is ordered, and its events fit the state they
//!   apply to (a DELETE removes the instance that was there, a PUT carries
//!   its revision);
//! - every acknowledged write's revision holds exactly the events the
//!   client asked for (a Register: one PUT of the instance sent, on the
//!   lease answered; Deregister{lease}: one DELETE per instance that lease
//!   held just before), no two writes share a revision, and every revision
//!   nobody acknowledged is an expiry that takes whole leases;
//! - write revisions strictly increase in real time and no read answers
//!   with a revision older than a write acknowledged before it was sent;
//! - every Resolve, ListServices and Status answer equals the model at the
//!   revision it is labelled with;
//! - every watcher's stream replays to the model: a snapshot equals the
//!   model at its revision, events arrive in order without duplicates and
//!   without skipping a revision that touched the watched service, each
//!   revision's events equal the model's, a reset replaces the state, and
//!   the watcher's state after every revision equals the model's;
//! - no lease id is granted twice (across lives, through [`LeaseBook`]),
//!   and no heartbeat or attach succeeds on a lease revoked before it was
//!   sent or never granted.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    time::Duration,
};

use registry_api::v1::{DeleteReason, watch_response::Kind};

use super::{
    Answer, Call, History, Op, WatchLog,
    model::{Ev, EvKind, Inst, Key, Model, View, diff},
};

/// One divergence.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The revision the divergence is about (the answer's label, the
    /// event's revision): violations are reported in this order, so the
    /// first printed is the first divergence.
    pub revision: u64,
    /// When the divergent answer was received (ties).
    pub at: Duration,
    pub what: String,
}

/// What was checked, so a pass says how much it covered.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub ops: usize,
    pub acked_writes: usize,
    pub failed_calls: usize,
    pub indeterminate_calls: usize,
    pub revisions: usize,
    pub expiry_revisions: usize,
    pub resolves_checked: usize,
    pub lists_checked: usize,
    pub statuses_checked: usize,
    pub watch_sessions: usize,
    pub watch_states_checked: usize,
    pub heartbeats: usize,
    /// Answers that could not be checked (labelled beyond what the
    /// recorder saw before the server died).
    pub unchecked: usize,
}

/// Who was granted a lease id.
#[derive(Debug, Clone)]
pub struct Grant {
    pub life: usize,
    pub client: usize,
    pub seq: usize,
    pub revision: u64,
    /// The TTL asked for.
    pub ttl_ms: u64,
}

impl Grant {
    fn describe(&self) -> String {
        if self.client == UNACKNOWLEDGED {
            format!(
                "first seen on an instance at revision {} of life {} (its Register was never answered)",
                self.revision, self.life
            )
        } else {
            format!(
                "to client {} op #{} of life {} at revision {}",
                self.client, self.seq, self.life, self.revision
            )
        }
    }
}

/// [`Grant::client`] of a lease seen only in the recorder's events (a
/// Register in flight when the server died).
pub const UNACKNOWLEDGED: usize = usize::MAX;

/// Every lease id granted so far, across server lives.
#[derive(Debug, Default)]
pub struct LeaseBook {
    pub grants: HashMap<u64, Grant>,
}

/// The recorder's view of a life: the snapshot it started with and the
/// events of every revision after it.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub start: u64,
    pub start_state: Vec<Inst>,
    pub revisions: BTreeMap<u64, Vec<Ev>>,
    /// Every revision up to here was received.
    pub last: u64,
    pub epoch: u64,
    pub notes: Vec<String>,
}

impl Timeline {
    /// Reads the recorder's stream; protocol breaks are violations.
    pub fn from_recorder(log: &WatchLog) -> (Self, Vec<Violation>) {
        let mut t = Timeline {
            start: 0,
            start_state: Vec::new(),
            revisions: BTreeMap::new(),
            last: 0,
            epoch: 0,
            notes: Vec::new(),
        };
        let mut violations = Vec::new();
        let Some(session) = log.sessions.first() else {
            t.notes.push("the recorder recorded nothing".into());
            return (t, violations);
        };
        let mut snapshot: Option<(u64, Vec<Inst>)> = None;
        let mut started = false;
        for msg in &session.messages {
            match msg.kind.as_ref() {
                Some(Kind::Snapshot(s)) if !started => {
                    let part = snapshot.get_or_insert((s.revision, Vec::new()));
                    if part.0 != s.revision {
                        violations.push(v(
                            s.revision,
                            Duration::ZERO,
                            format!(
                                "recorder: snapshot chunks carry revisions {} and {}",
                                part.0, s.revision
                            ),
                        ));
                    }
                    part.1.extend(s.instances.iter().map(Inst::from_pb));
                    if !s.more {
                        let (rev, insts) = snapshot.take().unwrap();
                        t.start = rev;
                        t.last = rev;
                        t.start_state = insts;
                        t.epoch = s.server.as_ref().map_or(0, |s| s.epoch);
                        started = true;
                    }
                }
                Some(Kind::Snapshot(s)) => {
                    t.notes.push(format!(
                        "the recorder was reset at revision {} ({}): revisions after {} are not checked",
                        s.revision,
                        s.reason().as_str_name(),
                        t.last
                    ));
                    break;
                }
                _ if !started => {
                    violations.push(v(
                        0,
                        Duration::ZERO,
                        format!(
                            "recorder: a watch from revision 0 began with {msg:?}, not a snapshot"
                        ),
                    ));
                    break;
                }
                Some(Kind::Events(batch)) => {
                    for (rev, evs) in group(&batch.events) {
                        if rev <= t.last {
                            violations.push(v(rev, Duration::ZERO, format!(
                                "recorder: revision {rev} arrived after revision {} (out of order or repeated)",
                                t.last)));
                            continue;
                        }
                        t.revisions.insert(rev, evs);
                        t.last = rev;
                    }
                }
                Some(Kind::Progress(p)) => {
                    if p.revision < t.last {
                        violations.push(v(
                            p.revision,
                            Duration::ZERO,
                            format!(
                                "recorder: progress at revision {} after revision {} was delivered",
                                p.revision, t.last
                            ),
                        ));
                    }
                    t.last = t.last.max(p.revision);
                }
                None => {}
            }
        }
        if !started {
            t.notes
                .push("the recorder never completed its snapshot".into());
        }
        (t, violations)
    }

    /// The model at `revision`, if the timeline covers it.
    pub fn model_at(&self, revision: u64) -> Option<Model> {
        if revision < self.start || revision > self.last {
            return None;
        }
        let mut m = Model::new(self.start, self.start_state.iter().cloned());
        for (r, evs) in self.revisions.range(..=revision) {
            let _ = m.apply(*r, evs);
        }
        m.revision = revision;
        Some(m)
    }

    /// True when every revision in `(after, upto]` was seen.
    pub fn covers(&self, after: u64, upto: u64) -> bool {
        after >= self.start && upto <= self.last
    }

    /// First revision in `(after, upto]` that changed `service` (`""`: any).
    pub fn first_touching(&self, service: &str, after: u64, upto: u64) -> Option<u64> {
        if upto <= after {
            return None;
        }
        self.revisions
            .range(after + 1..=upto)
            .find(|(_, evs)| service.is_empty() || evs.iter().any(|e| e.inst.service == service))
            .map(|(r, _)| *r)
    }

    /// Events of `revision` for a watcher of `service`, in a canonical order.
    pub fn events_for(&self, service: &str, revision: u64) -> Vec<Ev> {
        let mut evs: Vec<Ev> = self
            .revisions
            .get(&revision)
            .map(|evs| {
                evs.iter()
                    .filter(|e| service.is_empty() || e.inst.service == service)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        evs.sort_by_key(Ev::sort_key);
        evs
    }
}

fn v(revision: u64, at: Duration, what: String) -> Violation {
    Violation { revision, at, what }
}

/// Events grouped by revision, in stream order.
fn group(events: &[registry_api::v1::Event]) -> Vec<(u64, Vec<Ev>)> {
    let mut out: Vec<(u64, Vec<Ev>)> = Vec::new();
    for e in events {
        match out.last_mut() {
            Some((r, evs)) if *r == e.revision => evs.push(Ev::from_pb(e)),
            _ => out.push((e.revision, vec![Ev::from_pb(e)])),
        }
    }
    out
}

fn list(evs: &[Ev]) -> String {
    if evs.is_empty() {
        return "no events".into();
    }
    let mut s = String::new();
    for (i, e) in evs.iter().enumerate() {
        if i == 4 {
            let _ = write!(s, "; ... {} more", evs.len() - 4);
            break;
        }
        if i > 0 {
            s.push_str("; ");
        }
        let _ = write!(s, "{e}");
    }
    s
}

fn describe(op: &Op) -> String {
    let call = match &op.call {
        Call::Register {
            instance,
            ttl_ms,
            lease_id,
        } => format!(
            "Register{{{}/{} {} weight={} meta={:?}, ttl_ms={ttl_ms}, lease_id={lease_id}}}",
            instance.service, instance.id, instance.address, instance.weight, instance.metadata
        ),
        Call::DeregisterInstance { service, id } => {
            format!("Deregister{{instance {service}/{id}}}")
        }
        Call::DeregisterLease { lease_id } => format!("Deregister{{lease_id {lease_id}}}"),
        Call::Heartbeat { lease_ids } => format!("Heartbeat{{{lease_ids:?}}}"),
        Call::Resolve { service } => format!("Resolve{{{service}}}"),
        Call::ListServices => "ListServices".into(),
        Call::Status => "Status".into(),
    };
    format!(
        "client {} op #{} {call} (sent at {:?}, answered at {:?})",
        op.client, op.seq, op.invoke, op.ret
    )
}

/// Revision-labelled answers to check against the model, sorted by label.
enum Obs {
    Resolve(usize),
    List(usize),
    Status(usize),
    /// A watcher's state hash after a revision (or a complete snapshot).
    Watch {
        watch: usize,
        session: usize,
        msg: usize,
        hash: u64,
        snapshot: Option<Vec<Inst>>,
    },
}

/// Outcome of a check.
#[derive(Debug)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub stats: Stats,
    pub timeline: Timeline,
}

impl Report {
    /// Seed, life, and the first `max` violations (first divergence first).
    pub fn render(&self, seed: u64, life: usize, max: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "seed {seed}, life {life}: {} violation(s); the first divergence first:",
            self.violations.len()
        );
        for (i, x) in self.violations.iter().take(max).enumerate() {
            let _ = writeln!(s, "{:>3}. [revision {}] {}", i + 1, x.revision, x.what);
        }
        if self.violations.len() > max {
            let _ = writeln!(s, "     ... and {} more", self.violations.len() - max);
        }
        for n in &self.timeline.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(s, "checked: {:?}", self.stats);
        s
    }
}

/// Checks one life's history; grants are entered into `book`.
pub fn check(h: &History, book: &mut LeaseBook) -> Report {
    let (timeline, mut out) = Timeline::from_recorder(&h.recorder);
    let mut stats = Stats {
        ops: h.ops.len(),
        revisions: timeline.revisions.len(),
        ..Stats::default()
    };
    let final_rev = h.final_revision;
    if let Some(f) = final_rev
        && timeline.last < f
        && timeline.notes.is_empty()
    {
        out.push(v(timeline.last + 1, Duration::ZERO, format!(
            "the recorder saw revisions up to {} only, but Status said {f} once the clients had stopped",
            timeline.last
        )));
    }
    let indeterminate_writes = h
        .ops
        .iter()
        .any(|o| o.call.is_write() && matches!(&o.outcome, Err(f) if f.indeterminate()));

    // --- Acknowledged writes against the recorder's revisions. ---
    let mut claims: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut lease_revokes: HashMap<u64, (u64, usize)> = HashMap::new();
    for (i, op) in h.ops.iter().enumerate() {
        match &op.outcome {
            Err(f) => {
                stats.failed_calls += 1;
                if f.indeterminate() {
                    stats.indeterminate_calls += 1;
                }
                continue;
            }
            Ok(_) if op.call.is_write() => stats.acked_writes += 1,
            Ok(_) => {}
        }
        let Ok(answer) = &op.outcome else { continue };
        let (r, expected): (u64, Option<Vec<Ev>>) = match (&op.call, answer) {
            (
                Call::Register {
                    instance, lease_id, ..
                },
                Answer::Register(resp),
            ) => {
                let l = resp.lease_id;
                if l == 0 || (*lease_id != 0 && l != *lease_id) {
                    out.push(v(
                        resp.revision,
                        op.ret,
                        format!("{} was answered with lease_id {l}", describe(op)),
                    ));
                }
                if *lease_id == 0 {
                    let grant = Grant {
                        life: h.life,
                        client: op.client,
                        seq: op.seq,
                        revision: resp.revision,
                        ttl_ms: resp.ttl_ms,
                    };
                    if let Some(prev) = book.grants.insert(l, grant) {
                        out.push(v(resp.revision, op.ret, format!(
                            "lease id {l} granted twice: {}, and again to {} of life {} at revision {}",
                            prev.describe(), describe(op), h.life, resp.revision)));
                    }
                }
                let mut inst = Inst::from_pb(instance);
                inst.lease_id = l;
                inst.revision = resp.revision;
                (
                    resp.revision,
                    Some(vec![Ev {
                        kind: EvKind::Put,
                        inst,
                    }]),
                )
            }
            (Call::DeregisterInstance { service, id }, Answer::Deregister(resp)) => {
                if resp.removed != 1 {
                    out.push(v(
                        resp.revision,
                        op.ret,
                        format!(
                            "{} answered removed={} (one instance, or NOT_FOUND)",
                            describe(op),
                            resp.removed
                        ),
                    ));
                }
                // The instance's other fields are checked by the model.
                (
                    resp.revision,
                    Some(vec![Ev {
                        kind: EvKind::Delete(DeleteReason::Deregistered),
                        inst: Inst {
                            service: service.clone(),
                            id: id.clone(),
                            ..blank()
                        },
                    }]),
                )
            }
            (Call::DeregisterLease { lease_id }, Answer::Deregister(resp)) => {
                if resp.removed == 0 {
                    continue;
                }
                lease_revokes.insert(resp.revision, (*lease_id, i));
                (resp.revision, None)
            }
            _ => continue,
        };
        claims.entry(r).or_default().push(i);
        if r <= timeline.start {
            out.push(v(r, op.ret, format!(
                "{} was acknowledged at revision {r}, not above revision {} which the recorder had seen before the call was sent",
                describe(op), timeline.start)));
            continue;
        }
        if r > timeline.last {
            match final_rev {
                Some(f) if r > f => out.push(v(
                    r,
                    op.ret,
                    format!(
                        "{} was acknowledged at revision {r}, beyond the last revision {f}",
                        describe(op)
                    ),
                )),
                _ => stats.unchecked += 1,
            }
            continue;
        }
        let Some(got) = timeline.revisions.get(&r) else {
            out.push(v(
                r,
                op.ret,
                format!(
                    "{} was acknowledged at revision {r}, but no watcher ever saw revision {r}",
                    describe(op)
                ),
            ));
            continue;
        };
        match (&op.call, expected) {
            (Call::DeregisterLease { lease_id }, _) => {
                let Answer::Deregister(resp) = answer else {
                    unreachable!()
                };
                let ok = got.len() == resp.removed as usize
                    && got.iter().all(|e| {
                        e.kind == EvKind::Delete(DeleteReason::Deregistered)
                            && e.inst.lease_id == *lease_id
                    });
                if !ok {
                    out.push(v(
                        r,
                        op.ret,
                        format!(
                            "{} answered removed={} at revision {r}, but revision {r} holds: {}",
                            describe(op),
                            resp.removed,
                            list(got)
                        ),
                    ));
                }
            }
            (Call::DeregisterInstance { .. }, Some(exp)) => {
                let ok = got.len() == 1
                    && got[0].kind == exp[0].kind
                    && got[0].inst.key() == exp[0].inst.key();
                if !ok {
                    out.push(v(
                        r,
                        op.ret,
                        format!(
                            "{} acknowledged at revision {r}, but revision {r} holds: {}",
                            describe(op),
                            list(got)
                        ),
                    ));
                }
            }
            (_, Some(exp)) if got != &exp => {
                out.push(v(r, op.ret, format!(
                    "{} acknowledged at revision {r}; expected exactly {}, but revision {r} holds: {}",
                    describe(op), list(&exp), list(got))));
            }
            _ => {}
        }
    }
    for (r, ops) in &claims {
        if ops.len() > 1 {
            let who: Vec<String> = ops.iter().map(|i| describe(&h.ops[*i])).collect();
            out.push(v(
                *r,
                h.ops[ops[1]].ret,
                format!(
                    "{} acknowledged writes share revision {r}: {}",
                    ops.len(),
                    who.join(" | ")
                ),
            ));
        }
    }
    for (r, evs) in &timeline.revisions {
        let expired = evs
            .iter()
            .filter(|e| e.kind == EvKind::Delete(DeleteReason::Expired))
            .count();
        match (claims.contains_key(r), expired) {
            (false, n) if n == evs.len() && n > 0 => stats.expiry_revisions += 1,
            (false, _) if indeterminate_writes => stats.unchecked += 1,
            (false, _) => out.push(v(*r, Duration::ZERO, format!(
                "revision {r} changed the catalog ({}) but no acknowledged write claims it and it is not an expiry",
                list(evs)))),
            (true, n) if n > 0 => out.push(v(*r, Duration::ZERO, format!(
                "revision {r} of an acknowledged write also holds expiries: {}", list(evs)))),
            _ => {}
        }
    }

    // Leases granted by Registers whose answer was lost still count as
    // granted: a later life must not hand their ids out either.
    for (r, evs) in &timeline.revisions {
        for e in evs {
            if e.kind == EvKind::Put {
                book.grants.entry(e.inst.lease_id).or_insert(Grant {
                    life: h.life,
                    client: UNACKNOWLEDGED,
                    seq: 0,
                    revision: *r,
                    ttl_ms: 0,
                });
            }
        }
    }

    // --- Real time: revisions never go back. ---
    let mut writes: Vec<(Duration, u64, usize)> = h
        .ops
        .iter()
        .enumerate()
        .filter_map(|(i, o)| changed_revision(o).map(|r| (o.ret, r, i)))
        .collect();
    writes.sort();
    let mut by_invoke: Vec<usize> = (0..h.ops.len()).collect();
    by_invoke.sort_by_key(|i| h.ops[*i].invoke);
    let (mut next, mut bound, mut bound_op) = (0, 0u64, None);
    for i in by_invoke {
        let op = &h.ops[i];
        while next < writes.len() && writes[next].0 < op.invoke {
            if writes[next].1 > bound {
                bound = writes[next].1;
                bound_op = Some(writes[next].2);
            }
            next += 1;
        }
        let Some(r) = op.outcome.as_ref().ok().and_then(Answer::revision) else {
            continue;
        };
        let changing = changed_revision(op).is_some();
        if (changing && r <= bound) || (!changing && r < bound) {
            out.push(v(r, op.ret, format!(
                "{} answered revision {r}, but {} had already been acknowledged at revision {bound} before it was sent",
                describe(op),
                bound_op.map(|b| describe(&h.ops[b])).unwrap_or_default())));
        }
    }

    // --- Leases: heartbeats and attaches never reach a revoked or unknown lease. ---
    let restored: BTreeSet<u64> = timeline.start_state.iter().map(|i| i.lease_id).collect();
    let mut revoked_at: HashMap<u64, (Duration, usize)> = HashMap::new();
    for (i, op) in h.ops.iter().enumerate() {
        if let (Call::DeregisterLease { lease_id }, Ok(_)) = (&op.call, &op.outcome) {
            revoked_at.entry(*lease_id).or_insert((op.ret, i));
        }
    }
    for op in &h.ops {
        let touched: Vec<u64> = match (&op.call, &op.outcome) {
            (Call::Heartbeat { lease_ids }, Ok(Answer::Heartbeat(resp))) => {
                stats.heartbeats += 1;
                let answered: Vec<u64> = resp.leases.iter().map(|l| l.lease_id).collect();
                if &answered != lease_ids {
                    out.push(v(0, op.ret, format!(
                        "{} answered for leases {answered:?}: one status per requested id, in order", describe(op))));
                }
                resp.leases
                    .iter()
                    .filter(|l| l.found)
                    .map(|l| l.lease_id)
                    .collect()
            }
            (Call::Register { lease_id, .. }, Ok(_)) if *lease_id != 0 => vec![*lease_id],
            _ => continue,
        };
        for l in touched {
            if !book.grants.contains_key(&l) && !restored.contains(&l) {
                out.push(v(
                    op.outcome
                        .as_ref()
                        .ok()
                        .and_then(Answer::revision)
                        .unwrap_or(0),
                    op.ret,
                    format!(
                        "{} found lease {l}, which no client was ever granted",
                        describe(op)
                    ),
                ));
            }
            if let Some((ret, by)) = revoked_at.get(&l)
                && *ret < op.invoke
            {
                out.push(v(op.outcome.as_ref().ok().and_then(Answer::revision).unwrap_or(0), op.ret, format!(
                    "{} found lease {l}, whose revocation by {} was acknowledged before it was sent",
                    describe(op), describe(&h.ops[*by]))));
            }
        }
    }

    // --- Watchers: walk each stream. ---
    let mut obs: Vec<(u64, Obs)> = Vec::new();
    for (i, op) in h.ops.iter().enumerate() {
        match &op.outcome {
            Ok(Answer::Resolve(r)) => obs.push((r.revision, Obs::Resolve(i))),
            Ok(Answer::ListServices(r)) => obs.push((r.revision, Obs::List(i))),
            Ok(Answer::Status(r)) => obs.push((r.revision, Obs::Status(i))),
            _ => {}
        }
    }
    for (w, log) in h.watches.iter().enumerate() {
        walk_watch(w, log, &timeline, &mut obs, &mut out, &mut stats);
    }

    // --- The sweep: apply revisions in order, check every labelled answer. ---
    obs.sort_by_key(|(r, _)| *r);
    let mut model = Model::new(timeline.start, timeline.start_state.iter().cloned());
    let mut pending = obs.into_iter().peekable();
    let check_obs =
        |model: &Model, rev: u64, o: Obs, out: &mut Vec<Violation>, stats: &mut Stats| {
            check_observation(h, &timeline, model, rev, o, out, stats)
        };
    for (r, evs) in &timeline.revisions {
        while let Some((rev, _)) = pending.peek()
            && *rev < *r
        {
            let (rev, o) = pending.next().unwrap();
            check_obs(&model, rev, o, &mut out, &mut stats);
        }
        // Deregister{lease} and expiry take whole leases.
        let mut taken: BTreeMap<u64, (DeleteReason, BTreeSet<Key>)> = BTreeMap::new();
        for e in evs {
            if let EvKind::Delete(reason @ (DeleteReason::Expired | DeleteReason::Deregistered)) =
                e.kind
            {
                taken
                    .entry(e.inst.lease_id)
                    .or_insert((reason, BTreeSet::new()))
                    .1
                    .insert(e.inst.key());
            }
        }
        if let Some((lease, i)) = lease_revokes.get(r) {
            let held = model.lease_members(*lease);
            let removed = taken.get(lease).map(|(_, k)| k.clone()).unwrap_or_default();
            if held != removed {
                out.push(v(*r, h.ops[*i].ret, format!(
                    "{} removed {} instance(s) at revision {r}, but the lease held {} at revision {}: missing {:?}",
                    describe(&h.ops[*i]), removed.len(), held.len(), r - 1,
                    held.difference(&removed).take(5).collect::<Vec<_>>())));
            }
        }
        for (lease, (reason, keys)) in &taken {
            if *reason != DeleteReason::Expired {
                continue;
            }
            let held = model.lease_members(*lease);
            if &held != keys {
                out.push(v(*r, Duration::ZERO, format!(
                    "lease {lease} expired at revision {r} taking {} instance(s), but it held {}: left behind {:?}",
                    keys.len(), held.len(), held.difference(keys).take(5).collect::<Vec<_>>())));
            }
        }
        if let Err(e) = model.apply(*r, evs) {
            out.push(v(
                *r,
                Duration::ZERO,
                format!(
                    "the events of revision {r} do not fit the state at revision {}: {e}",
                    r - 1
                ),
            ));
        }
    }
    model.revision = timeline.last;
    for (rev, o) in pending {
        check_obs(&model, rev, o, &mut out, &mut stats);
    }

    out.sort_by_key(|x| (x.revision, x.at));
    Report {
        violations: out,
        stats,
        timeline,
    }
}

fn blank() -> Inst {
    Inst {
        service: String::new(),
        id: String::new(),
        address: String::new(),
        metadata: BTreeMap::new(),
        weight: 0,
        lease_id: 0,
        revision: 0,
    }
}

/// The highest revision of a write acknowledged in `h` that changed the
/// catalog, with the operation: what a crash must not lose.
pub fn max_acked_write(h: &History) -> Option<(u64, &Op)> {
    h.ops
        .iter()
        .filter_map(|o| changed_revision(o).map(|r| (r, o)))
        .max_by_key(|(r, _)| *r)
}

/// [`describe`] for other checks (the crash test).
pub fn describe_op(op: &Op) -> String {
    describe(op)
}

/// The revision of a write that changed the catalog.
fn changed_revision(op: &Op) -> Option<u64> {
    match (&op.call, op.outcome.as_ref().ok()?) {
        (Call::Register { .. }, Answer::Register(r)) => Some(r.revision),
        (Call::DeregisterInstance { .. } | Call::DeregisterLease { .. }, Answer::Deregister(r))
            if r.removed > 0 =>
        {
            Some(r.revision)
        }
        _ => None,
    }
}

fn check_observation(
    h: &History,
    t: &Timeline,
    model: &Model,
    rev: u64,
    o: Obs,
    out: &mut Vec<Violation>,
    stats: &mut Stats,
) {
    let (what, at) = match &o {
        Obs::Resolve(i) | Obs::List(i) | Obs::Status(i) => (describe(&h.ops[*i]), h.ops[*i].ret),
        Obs::Watch {
            watch,
            session,
            msg,
            ..
        } => (
            format!(
                "{} (watching {:?}) session {session} message {msg}",
                h.watches[*watch].name, h.watches[*watch].service
            ),
            Duration::ZERO,
        ),
    };
    if rev < t.start {
        out.push(v(rev, at, format!(
            "{what} answered revision {rev}, older than revision {} the recorder had already seen before it was sent",
            t.start)));
        return;
    }
    if rev > t.last {
        match h.final_revision {
            Some(f) if rev > f => out.push(v(
                rev,
                at,
                format!("{what} answered revision {rev}, beyond the last revision {f}"),
            )),
            _ => stats.unchecked += 1,
        }
        return;
    }
    let empty = View::default();
    match o {
        Obs::Resolve(i) => {
            stats.resolves_checked += 1;
            let Ok(Answer::Resolve(resp)) = &h.ops[i].outcome else {
                return;
            };
            let Call::Resolve { service } = &h.ops[i].call else {
                return;
            };
            let expected = model.view(service).unwrap_or(&empty);
            let got: Vec<Inst> = resp.instances.iter().map(Inst::from_pb).collect();
            let sorted = got.windows(2).all(|w| w[0].id < w[1].id);
            let equal = got.len() == expected.len()
                && got.iter().all(|g| expected.map.get(&g.key()) == Some(g));
            if !equal || !sorted {
                out.push(v(rev, at, format!(
                    "{what} answered {} instance(s) at revision {rev}, which is not the state at revision {rev}{}: {}",
                    got.len(),
                    if sorted { "" } else { " (and not ordered by id)" },
                    diff(&expected.map, &got))));
            }
            if !resp.service_known && expected.len() > 0 {
                out.push(v(rev, at, format!(
                    "{what} said service_known=false at revision {rev}, when it had {} instance(s)", expected.len())));
            }
        }
        Obs::List(i) => {
            stats.lists_checked += 1;
            let Ok(Answer::ListServices(resp)) = &h.ops[i].outcome else {
                return;
            };
            let got: BTreeMap<&str, usize> = resp
                .services
                .iter()
                .map(|s| (s.name.as_str(), s.instance_count as usize))
                .collect();
            let expected = model.counts();
            let wrong: Vec<String> = got
                .iter()
                .filter(|(s, n)| expected.get(**s).copied().unwrap_or(0) != **n)
                .map(|(s, n)| {
                    format!(
                        "{s}: {n} (expected {})",
                        expected.get(*s).copied().unwrap_or(0)
                    )
                })
                .chain(
                    expected
                        .iter()
                        .filter(|(s, _)| !got.contains_key(**s))
                        .map(|(s, n)| format!("{s}: missing (expected {n})")),
                )
                .collect();
            if !wrong.is_empty() {
                out.push(v(
                    rev,
                    at,
                    format!(
                        "{what} answered counts that are not the state at revision {rev}: {}",
                        wrong.join(", ")
                    ),
                ));
            }
        }
        Obs::Status(i) => {
            stats.statuses_checked += 1;
            let Ok(Answer::Status(resp)) = &h.ops[i].outcome else {
                return;
            };
            if resp.instances as usize != model.count("") {
                out.push(v(rev, at, format!(
                    "{what} answered instances={} at revision {rev}; the state at revision {rev} has {}",
                    resp.instances, model.count(""))));
            }
        }
        Obs::Watch {
            watch,
            session,
            msg,
            hash,
            snapshot,
        } => {
            stats.watch_states_checked += 1;
            let service = &h.watches[watch].service;
            if hash == model.hash(service) {
                return;
            }
            let expected = model.view(service).unwrap_or(&empty);
            let got: Vec<Inst> = match snapshot {
                Some(s) => s,
                None => replay(&h.watches[watch], session, msg)
                    .map
                    .into_values()
                    .collect(),
            };
            out.push(v(rev, at, format!(
                "{what}: the watcher's state at revision {rev} is not the state at revision {rev}: {}",
                diff(&expected.map, &got))));
        }
    }
}

/// A watcher's state after message `upto` of session `upto_session`,
/// rebuilt without checks (for failure messages).
fn replay(log: &WatchLog, upto_session: usize, upto: usize) -> View {
    let mut state = View::default();
    let mut chunks: Option<Vec<Inst>> = None;
    for (si, s) in log.sessions.iter().enumerate().take(upto_session + 1) {
        for (mi, m) in s.messages.iter().enumerate() {
            if si == upto_session && mi > upto {
                break;
            }
            match m.kind.as_ref() {
                Some(Kind::Snapshot(snap)) => {
                    chunks
                        .get_or_insert_with(Vec::new)
                        .extend(snap.instances.iter().map(Inst::from_pb));
                    if !snap.more {
                        state = View::from_instances(chunks.take().unwrap());
                    }
                }
                Some(Kind::Events(b)) => {
                    for e in b.events.iter().map(Ev::from_pb) {
                        match e.kind {
                            EvKind::Put => state.put(e.inst),
                            EvKind::Delete(_) => {
                                state.delete(&e.inst.key());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        chunks = None;
    }
    state
}

/// Walks one watcher's sessions: protocol checks here, state checks queued
/// as observations for the sweep.
fn walk_watch(
    w: usize,
    log: &WatchLog,
    t: &Timeline,
    obs: &mut Vec<(u64, Obs)>,
    out: &mut Vec<Violation>,
    stats: &mut Stats,
) {
    let service = log.service.as_str();
    let name = format!("{} (watching {service:?})", log.name);
    let mut state = View::default();
    let mut have_state = false;
    let mut last = 0u64;
    for (si, s) in log.sessions.iter().enumerate() {
        stats.watch_sessions += 1;
        if s.start_revision != 0 && have_state && s.start_revision != last + 1 {
            out.push(v(
                s.start_revision,
                Duration::ZERO,
                format!(
                    "harness: {name} session {si} resumed from {} after revision {last}",
                    s.start_revision
                ),
            ));
        }
        let mut chunks: Option<(u64, bool, Vec<Inst>, usize)> = None;
        for (mi, m) in s.messages.iter().enumerate() {
            let here = format!(
                "{name} session {si} (start_revision {}) message {mi}",
                s.start_revision
            );
            match m.kind.as_ref() {
                None => {}
                Some(Kind::Snapshot(snap)) => {
                    let c = chunks.get_or_insert((snap.revision, snap.reset, Vec::new(), mi));
                    if c.0 != snap.revision {
                        out.push(v(
                            snap.revision,
                            Duration::ZERO,
                            format!(
                                "{here}: snapshot chunks carry revisions {} and {}",
                                c.0, snap.revision
                            ),
                        ));
                    }
                    c.2.extend(snap.instances.iter().map(Inst::from_pb));
                    if snap.more {
                        continue;
                    }
                    let (rev, reset, insts, first) = chunks.take().unwrap();
                    if s.start_revision != 0 && !reset {
                        out.push(v(rev, Duration::ZERO, format!(
                            "{here}: a resumed watch was answered with a snapshot not marked reset")));
                    }
                    if s.start_revision == 0 && first != 0 && !reset {
                        out.push(v(
                            rev,
                            Duration::ZERO,
                            format!("{here}: a second snapshot in a watch from revision 0, not marked reset"),
                        ));
                    }
                    if have_state && rev < last {
                        out.push(v(rev, Duration::ZERO, format!(
                            "{here}: reset snapshot at revision {rev} goes back before revision {last}, already delivered")));
                    }
                    state = View::from_instances(insts.iter().cloned());
                    if state.len() != insts.len() {
                        out.push(v(
                            rev,
                            Duration::ZERO,
                            format!("{here}: snapshot at revision {rev} lists an instance twice"),
                        ));
                    }
                    have_state = true;
                    last = rev;
                    obs.push((
                        rev,
                        Obs::Watch {
                            watch: w,
                            session: si,
                            msg: mi,
                            hash: state.hash,
                            snapshot: Some(insts),
                        },
                    ));
                }
                Some(Kind::Events(batch)) => {
                    if !have_state {
                        out.push(v(
                            0,
                            Duration::ZERO,
                            format!("{here}: events before any snapshot"),
                        ));
                        continue;
                    }
                    for (r, evs) in group(&batch.events) {
                        if r <= last {
                            out.push(v(r, Duration::ZERO, format!(
                                "{here}: revision {r} delivered after revision {last} (out of order or repeated)")));
                            continue;
                        }
                        if t.covers(last, r) {
                            if let Some(g) = t.first_touching(service, last, r - 1) {
                                out.push(v(g, Duration::ZERO, format!(
                                    "{here}: jumped from revision {last} to {r}, skipping revision {g} ({})",
                                    list(&t.events_for(service, g)))));
                            }
                            let mut got = evs.clone();
                            got.sort_by_key(Ev::sort_key);
                            let expected = t.events_for(service, r);
                            if got != expected {
                                out.push(v(r, Duration::ZERO, format!(
                                    "{here}: revision {r} delivered as [{}], but the revision is [{}]",
                                    list(&got), list(&expected))));
                            }
                        }
                        for e in evs {
                            match e.kind {
                                EvKind::Put => state.put(e.inst),
                                EvKind::Delete(_) => {
                                    if state.delete(&e.inst.key()).is_none() {
                                        out.push(v(r, Duration::ZERO, format!(
                                            "{here}: DELETE of {} which the watcher does not hold", e.inst)));
                                    }
                                }
                            }
                        }
                        last = r;
                        obs.push((
                            r,
                            Obs::Watch {
                                watch: w,
                                session: si,
                                msg: mi,
                                hash: state.hash,
                                snapshot: None,
                            },
                        ));
                    }
                }
                Some(Kind::Progress(p)) => {
                    if !have_state {
                        continue;
                    }
                    if p.revision < last {
                        out.push(v(p.revision, Duration::ZERO, format!(
                            "{here}: progress at revision {} after revision {last} was delivered", p.revision)));
                        continue;
                    }
                    if t.covers(last, p.revision)
                        && let Some(g) = t.first_touching(service, last, p.revision)
                    {
                        out.push(v(g, Duration::ZERO, format!(
                            "{here}: progress at revision {} says nothing changed since {last}, but revision {g} did ({})",
                            p.revision, list(&t.events_for(service, g)))));
                    }
                    last = p.revision;
                    obs.push((
                        last,
                        Obs::Watch {
                            watch: w,
                            session: si,
                            msg: mi,
                            hash: state.hash,
                            snapshot: None,
                        },
                    ));
                }
            }
        }
    }
}
