/* Firmware example (one input, one classifier output named "logits"): run the generated PFP library once on the
 * input in input_data.h, print the predictive mean and variance of every logit, then the class, its probability,
 * the predictive entropy and the decision over semihosting (QEMU prints it).
 * The library must be compiled with --outputs probs,entropy: it then computes the class probabilities (the mean-field
 * approximation of E[softmax] over the Gaussian logits, pfpc's default output method) and their entropy itself, and
 * its header has pfp_model_decide(score, threshold).
 * Startup code and linker script come with the generated library (OUT/firmware/, for Cortex-M targets). */
#include <stdio.h>

#include "pfp_model.h"
#include "input_data.h" /* const float pfp_example_input[PFP_MODEL_INPUT0_ELEMENTS] */

#if !defined(PFP_MODEL_LOGITS_PROBS_ELEMENTS) || !defined(PFP_MODEL_LOGITS_ENTROPY_ELEMENTS)
#error "compile the model with --outputs probs,entropy (see the Makefile)"
#endif

/* Abstain when the predictive entropy (nats) exceeds this. Take it from `pfpc evaluate --thresholds-into OUT` on your
 * own in-distribution data: it writes PFP_MODEL_ABSTAIN_ENTROPY_COV95 (95 % of that data accepted) into the header. */
#ifndef ABSTAIN_ENTROPY
#ifdef PFP_MODEL_ABSTAIN_ENTROPY_COV95
#define ABSTAIN_ENTROPY PFP_MODEL_ABSTAIN_ENTROPY_COV95
#else
#define ABSTAIN_ENTROPY 0.5f
#endif
#endif

static float mean[PFP_MODEL_OUTPUT0_ELEMENTS];
static float var[PFP_MODEL_OUTPUT0_ELEMENTS];
static float probs[PFP_MODEL_LOGITS_PROBS_ELEMENTS];
static float entropy[PFP_MODEL_LOGITS_ENTROPY_ELEMENTS];

int main(int argc, char** argv) {
  int i, best = 0;
  (void)argc; /* pfpc's startup passes the semihosting command line; unused here */
  (void)argv;
  pfp_model_run(pfp_example_input, mean, var, probs, entropy, NULL);
  for (i = 0; i < PFP_MODEL_OUTPUT0_ELEMENTS; ++i) {
    printf("%d mean %.9g var %.9g\n", i, (double)mean[i], (double)var[i]);
  }
  for (i = 1; i < PFP_MODEL_LOGITS_PROBS_ELEMENTS; ++i) {
    if (probs[i] > probs[best]) best = i;
  }
  printf("class %d probability %.6f entropy %.6f %s\n", best, (double)probs[best], (double)entropy[0],
         pfp_model_decide(entropy[0], ABSTAIN_ENTROPY) ? "accept" : "abstain");
  return 0;
}
