// kstatus prints what kstatus computes for Kubernetes objects: the status that Flux's health checks,
// `helm install --wait` (Helm 4), kpt and cli-utils' appliers wait on (Current, InProgress, Failed,
// Terminating, Unknown) and its message. It reads one object, or a List, as JSON or YAML on stdin
// and writes one JSON line per object, computed by sigs.k8s.io/cli-utils and by Flux's fork of it,
// github.com/fluxcd/cli-utils (which Flux and Helm 4 build with):
//
//	kubectl get qlorajob demo -o json | kstatus
//	{"name":"demo","status":"InProgress","message":"...","conditions":[...],"fluxcd":{"status":...}}
//
// A separate module from the local cluster's wrapper, so that cli-utils' requirements never move
// the versions the control plane is built from.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	fluxstatus "github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	Name       string             `json:"name"`
	Status     status.Status      `json:"status"`
	Message    string             `json:"message"`
	Conditions []status.Condition `json:"conditions"`
	FluxCD     fluxVerdict        `json:"fluxcd"`
}

type fluxVerdict struct {
	Status  fluxstatus.Status `json:"status"`
	Message string            `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	raw, err := io.ReadAll(in)
	if err != nil {
		return err
	}
	asJSON, err := yaml.YAMLToJSON(raw) // JSON is YAML: either is fine
	if err != nil {
		return err
	}
	// The API machinery's own decoder: whole numbers become int64, as in objects read from a
	// client, which kstatus's field accessors require (generation, observedGeneration).
	obj := map[string]interface{}{}
	if err := utiljson.Unmarshal(asJSON, &obj); err != nil {
		return err
	}
	objects := []map[string]interface{}{obj}
	if items, isList := obj["items"].([]interface{}); isList {
		objects = objects[:0]
		for _, item := range items {
			m, ok := item.(map[string]interface{})
			if !ok {
				return fmt.Errorf("a list item is not an object")
			}
			objects = append(objects, m)
		}
	}
	encoder := json.NewEncoder(out)
	for _, o := range objects {
		u := &unstructured.Unstructured{Object: o}
		result, err := status.Compute(u)
		if err != nil {
			return fmt.Errorf("%s: %w", u.GetName(), err)
		}
		flux, err := fluxstatus.Compute(u.DeepCopy())
		if err != nil {
			return fmt.Errorf("%s (fluxcd): %w", u.GetName(), err)
		}
		v := verdict{u.GetName(), result.Status, result.Message, result.Conditions,
			fluxVerdict{flux.Status, flux.Message}}
		if err := encoder.Encode(v); err != nil {
			return err
		}
	}
	return nil
}
