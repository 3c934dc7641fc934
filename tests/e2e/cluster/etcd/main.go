// Command etcd is upstream etcd's own server entry point, built from the
// go.etcd.io/etcd/server/v3 module that k8s.io/kubernetes already depends on
// (Debian's etcd package is too old for kube-apiserver).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
