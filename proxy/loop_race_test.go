//go:build race

package proxy

// raceEnabled: the race detector multiplies memory use, so footprint
// assertions are off.
const raceEnabled = true
