"""What a flow that runs stages returns: the summaries of the stages that finished and the error that stopped
it, if one did. A failed run's outcome travels in a Prefect Failed state, so that the flow run is marked
failed (in the Prefect UI too) while the caller still learns what finished."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.states import Failed, State


@dataclass
class RunOutcome:
    summaries: list[dict]
    error: BaseException | None = None

    def result(self) -> list[dict]:
        """The summaries, or the error raised."""
        if self.error is not None:
            raise self.error
        return self.summaries


def flow_return(outcome: RunOutcome) -> RunOutcome | State:
    """What the flow returns: the outcome, in a Failed state when it carries an error."""
    if outcome.error is None:
        return outcome
    error = outcome.error
    return Failed(message=f"Flow run encountered an exception: {type(error).__name__}: {error}", data=outcome)


def outcome_of(state: State) -> RunOutcome:
    """The outcome in the final state of such a flow (called with return_state=True). An error the flow
    raised before its stages ran, when there is no outcome, is raised here."""
    value = state.result(raise_on_failure=False)
    if isinstance(value, RunOutcome):
        return value
    if isinstance(value, BaseException):
        raise value
    raise TypeError(f"a flow running stages returned {value!r}, not a RunOutcome")
