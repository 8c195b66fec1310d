"""The mixed-state presentation (MSP) of a token-labelled HMM or generalized HMM: its exact theory where finite.

A process given by token matrices T[x] (K, H, H), a normalising vector r with (sum_x T[x]) r = r
(r = 1 for an HMM) and a start vector eta_0 with eta_0 . r = 1 gives every word the probability
p(x_1..x_n) = eta_0 T[x_1] ... T[x_n] r. After a prefix, the optimal predictor holds the belief
eta = eta_0 T[x_1] ... T[x_n] / p(x_1..x_n) (a law over hidden states for an HMM, a quasi-belief
of any sign for a generalized HMM) and predicts p(x | eta) = eta T[x] r. The MSP is the set of
beliefs reachable from eta_0 with the probability of each token from each belief and the belief
it leads to (Crutchfield, Ellison & Riechers 2016; Riechers & Crutchfield 2018). It is built
breadth first, one depth (prefix length) at a time.

Where it closes (no new belief appears) within MSP_MAX_STATES states, every theory number is a
finite sum over its states: the law of the belief at depth t is the start's weight pushed forward
t times, so the optimal loss at position t is sum_s w_{t-1}(s) H(p(. | s)) and the accuracy
sum_s w_{t-1}(s) max_x p(x | s). Where it does not close, the depths it completed still give
those positions exactly.
"""

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.processes.numerics import entropy

# The most MSP states built. Each is a belief of H floats found by a dictionary lookup per (state,
# token) in Python: 5,000 states of K = 11 tokens take ~0.1 s, and cover every finite MSP of the
# named HMMs (days_of_week 28, rrxor 36); an MSP that grows K^depth (mess3) passes it at depth 8.
MSP_MAX_STATES = 5000
# Two beliefs whose entries agree to this (rounded to a grid of this step) are one state. Beliefs
# reached along different words differ by float rounding, ~1e-15; merging beliefs this close moves
# a next-token entropy by at most ~1e-8, below every digit theory prints.
MSP_TOLERANCE = 1e-10
# Beliefs merged by MSP_TOLERANCE that differ by more than this (relative to the larger entry, at least 1) are
# different beliefs, not float rounding of one (that is ~1e-16): the MSP is then exact only before their depth.
ROUNDING_GAP = 1e-12
# Expanding a state costs K * H^2 multiply-adds (one belief times every token's matrix): fewer states
# are built where 5,000 of them would cost more than this (~1 s), e.g. a random HMM with H = K = 250.
MSP_MAX_WORK = 2**30
# The walk from the start has reached the recurrent states once less than ABSORBED_MASS of it is
# elsewhere (below float64's resolution of a law); pushing forward longer than ABSORPTION_STEPS, a
# dense linear solve gives that law instead.
ABSORBED_MASS = 1e-17
ABSORPTION_STEPS = 20_000


def msp_state_cap(n_tokens, n_hidden):
    """The most MSP states built for K tokens and H hidden states: MSP_MAX_STATES, fewer where MSP_MAX_WORK binds."""
    return max(1, min(MSP_MAX_STATES, MSP_MAX_WORK // (n_tokens * n_hidden * n_hidden)))


class MixedStatePresentation:
    """The beliefs reachable from a start, as far as MSP_MAX_STATES allows (see the module docstring).

    beliefs (S, H): the states, in breadth-first order, state 0 the start; depths (S,): the length
    of the shortest word reaching each; probs (S, K): p(x | state) (0 where never built); successors
    (S, K): the state each token leads to, -1 where its probability is at most `floor` or the state
    was not expanded. closed: every state expanded and no new one; complete_depth: the deepest
    depth whose beliefs are all known (every depth when closed); passed_depth: the depth at which
    the cap was passed (None when closed).
    """

    def __init__(self, token_transitions, normaliser, start, max_states=MSP_MAX_STATES, floor=0.0):
        self.token_transitions = np.asarray(token_transitions, dtype=np.float64)
        emissions = self.token_transitions @ normaliser  # (K, H): p(x | eta) = eta @ emissions[x]
        n_tokens = len(emissions)
        beliefs, index = [np.asarray(start, dtype=np.float64)], {}
        index[belief_key(beliefs[0])] = 0
        successors, probs, depths = [], [], [0]
        layer, depth, self.passed_depth = [0], 0, None
        while layer and self.passed_depth is None:
            current = np.array([beliefs[s] for s in layer])
            layer_probs = current @ emissions.T
            nexts = np.einsum("sh,xhj->sxj", current, self.token_transitions)
            next_layer = []
            for row in range(len(layer)):
                row_successors = np.full(n_tokens, -1)
                for token in np.flatnonzero(layer_probs[row] > floor):
                    belief = nexts[row, token] / layer_probs[row, token]
                    key = belief_key(belief)
                    if key not in index:
                        if len(beliefs) >= max_states:
                            self.passed_depth = depth + 1
                            break
                        index[key] = len(beliefs)
                        beliefs.append(belief)
                        depths.append(depth + 1)
                        next_layer.append(index[key])
                    row_successors[token] = index[key]
                successors.append(row_successors)
                probs.append(layer_probs[row])
            layer, depth = next_layer, depth + 1
        self.closed = self.passed_depth is None
        self.complete_depth = None if self.closed else self.passed_depth - 1
        self.beliefs, self.depths = np.array(beliefs), np.array(depths)
        expanded = len(successors)
        self.probs = np.zeros((len(beliefs), n_tokens))
        self.probs[:expanded] = np.array(probs)
        self.successors = np.full((len(beliefs), n_tokens), -1)
        self.successors[:expanded] = np.array(successors)
        self.n_states = len(beliefs)

    def first_merge(self, block=256):
        """(depth, gap) of the first belief that was merged into a different one (apart by more than ROUNDING_GAP,
        within MSP_TOLERANCE) and the largest such gap; (None, 0.0) where every merge was float rounding.

        Beliefs before that depth are exact; from it on, a state stands for beliefs within MSP_TOLERANCE of it."""
        depth, largest = None, 0.0
        for lo in range(0, self.n_states, block):
            states = np.arange(lo, min(lo + block, self.n_states))
            rows, tokens = np.nonzero(self.successors[states] >= 0)
            nexts = np.einsum("sh,xhj->sxj", self.beliefs[states], self.token_transitions)[rows, tokens]
            reached = nexts / self.probs[states[rows], tokens][:, None]
            stored = self.beliefs[self.successors[states[rows], tokens]]
            gaps = np.abs(reached - stored).max(axis=1) / np.maximum(1.0, np.abs(stored).max(axis=1))
            merged = gaps > ROUNDING_GAP
            if merged.any():
                first = int(self.depths[states[rows[merged]]].min()) + 1
                depth, largest = min(first, depth or first), max(largest, float(gaps.max()))
        return depth, largest

    def covers(self, n_positions):
        """Whether positions 1..n are exact: the beliefs at depths 0..n-1 are all known."""
        return self.closed or n_positions - 1 <= self.complete_depth

    def weights_by_depth(self, n_positions):
        """The law of the state at depths 0..n-1, (n, S): the start's weight pushed forward by probs."""
        if not self.covers(n_positions):
            raise NanoMarkovError(
                f"the mixed-state presentation is complete to depth {self.complete_depth} only; "
                f"{n_positions} positions need depth {n_positions - 1}"
            )
        weights = np.zeros((n_positions, self.n_states))
        weights[0, 0] = 1.0
        for t in range(1, n_positions):
            weights[t] = push_forward(weights[t - 1], self.successors, self.probs)
        return weights

    def loss_and_accuracy(self, n_positions):
        """The optimal predictor's expected loss and accuracy at positions 1..n: two (n,) arrays, exact."""
        weights = self.weights_by_depth(n_positions)
        return weights @ entropy(np.clip(self.probs, 0.0, None)), weights @ self.probs.max(axis=1)

    def state_ids(self, tokens):
        """The state after every prefix of token sequences (n, L) without BOS: (n, L+1), column 0 the start.

        A token of probability 0 (or one leading out of what was built) leaves the state where it is,
        as the forward filter leaves its belief at its prior."""
        ids = np.zeros((tokens.shape[0], tokens.shape[1] + 1), dtype=np.int64)
        for t in range(tokens.shape[1]):
            following = self.successors[ids[:, t], tokens[:, t]]
            ids[:, t + 1] = np.where(following >= 0, following, ids[:, t])
        return ids

    def class_chain(self, members):
        """The MSP's transition matrix restricted to a closed class, (len(members),) * 2."""
        position = np.full(self.n_states, -1)
        position[members] = np.arange(len(members))
        chain = np.zeros((len(members), len(members)))
        rows, tokens = np.nonzero(self.successors[members] >= 0)
        np.add.at(chain, (rows, position[self.successors[members][rows, tokens]]), self.probs[members][rows, tokens])
        return chain

    def arrival(self, recurrent):
        """The law of the first recurrent state the walk from the start reaches, (S,).

        The transient mass is pushed forward until less than ABSORBED_MASS is left (a geometric decay
        in a finite chain); where that takes more than ABSORPTION_STEPS, the expected visits v to the
        transient states solve v (I - Q) = e_start, a dense system."""
        weights, arrival = np.zeros(self.n_states), np.zeros(self.n_states)
        weights[0] = 1.0
        for _ in range(ABSORPTION_STEPS):
            arrival[recurrent] += weights[recurrent]
            weights[recurrent] = 0.0
            if weights.sum() < ABSORBED_MASS:
                return arrival
            weights = push_forward(weights, self.successors, self.probs)
        transient = np.flatnonzero(~recurrent)
        chain = np.zeros((self.n_states, self.n_states))
        valid = self.successors >= 0
        np.add.at(chain, (np.nonzero(valid)[0], self.successors[valid]), self.probs[valid])
        start = (transient == 0).astype(np.float64)
        visits = np.linalg.solve((np.eye(len(transient)) - chain[np.ix_(transient, transient)]).T, start)
        arrival = np.zeros(self.n_states)
        arrival[recurrent] = visits @ chain[np.ix_(transient, np.flatnonzero(recurrent))]
        return arrival

    def entropy_rate(self):
        """lim_L H(x_1..x_L) / L of a closed MSP, exact (see recurrent_law)."""
        return float(self.recurrent_law() @ entropy(np.clip(self.probs, 0.0, None)))

    def recurrent_law(self):
        """The Cesaro limit of the law of the state, (S,): sum over the closed classes c of the MSP's
        chain of P(the walk from the start ends in c) times c's stationary law.

        Why it gives the entropy rate: H(x_1..x_L) = sum_{t<=L} E_t with E_t = sum_s w_{t-1}(s) H(p(. | s)),
        so H(L) / L is E_t's Cesaro mean, and the Cesaro mean of w_t is this law (periodic classes
        included); for a stationary process it is also lim H(L) - H(L-1)."""
        if not self.closed:
            raise NanoMarkovError("the entropy rate of an MSP that does not close is not a finite sum")
        classes = closed_classes(self.successors)
        recurrent = np.zeros(self.n_states, dtype=bool)
        for members in classes:
            recurrent[members] = True
        arrival = self.arrival(recurrent)
        law = np.zeros(self.n_states)
        for members in classes:
            law[members] = arrival[members].sum() * class_stationary(self.class_chain(members))
        return law


def push_forward(weights, successors, probs):
    """The law of the next state given the law `weights` of the current one."""
    valid = successors >= 0
    return np.bincount(successors[valid], weights=(weights[:, None] * probs)[valid], minlength=len(weights))


def belief_key(belief):
    """The dictionary key of a belief: its entries rounded to MSP_TOLERANCE."""
    return np.round(belief / MSP_TOLERANCE).astype(np.int64).tobytes()


def class_stationary(chain):
    """The stationary law of an irreducible stochastic matrix (unique, periodic or not)."""
    n = len(chain)
    system = chain.T - np.eye(n)
    system[-1] = 1.0
    rhs = np.zeros(n)
    rhs[-1] = 1.0
    return np.linalg.solve(system, rhs)


def closed_classes(successors):
    """The closed strongly connected classes of the graph state -> successors (-1: no edge), each an index array.

    Tarjan's algorithm, iterative (an MSP's chains of states are deeper than Python's recursion)."""
    n = len(successors)
    order, low, on_stack = np.full(n, -1), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    stack, components, counter = [], [], 0
    for root in range(n):
        if order[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            node, edge = work.pop()
            if edge == 0:
                order[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            targets = successors[node][successors[node] >= 0]
            if edge < len(targets):
                work.append((node, edge + 1))
                target = targets[edge]
                if order[target] < 0:
                    work.append((target, 0))
                elif on_stack[target]:
                    low[node] = min(low[node], order[target])
                continue
            if work and work[-1][0] != node:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == order[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    members.append(member)
                    if member == node:
                        break
                components.append(np.array(members))
    closed = []
    for members in components:
        targets = successors[members]
        if np.all(np.isin(targets[targets >= 0], members)):
            closed.append(np.sort(members))
    return closed
